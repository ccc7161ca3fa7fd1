//! Reading the TOML: durations and the other values with a syntax of
//! their own, the private `Raw*` structures that mirror the file one to
//! one, and the mapping of an error back to its file line and key path
//! (by walking the span-keeping `toml_edit` document).

use super::*;

// ---------------------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------------------

pub(super) const DURATION_HELP: &str =
    "write a whole number with a unit: \"500us\", \"10ms\", \"2s\", \"1m\" (units: us, ms, s, m, h)";

/// Parses `"500us"`, `"10ms"`, `"2s"`, `"1m"`, `"1h"` (also `"µs"`). A whole number and a
/// unit, no spaces; bare numbers and unknown units are rejected.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = s.split_at(digits);
    if num.is_empty() {
        return Err(format!("invalid duration \"{s}\": {DURATION_HELP}"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration \"{s}\": number too large"))?;
    let micros_per_unit: u64 = match unit {
        "us" | "µs" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "" => {
            return Err(format!(
                "invalid duration \"{s}\": missing unit; {DURATION_HELP}"
            ))
        }
        _ => {
            return Err(format!(
                "invalid duration \"{s}\": unknown unit \"{unit}\"; {DURATION_HELP}"
            ))
        }
    };
    n.checked_mul(micros_per_unit)
        .map(Duration::from_micros)
        .ok_or_else(|| format!("invalid duration \"{s}\": too large"))
}

/// Formats a duration in the largest unit that represents it exactly (`"10ms"`, `"2s"`).
pub fn format_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us == 0 {
        if d.is_zero() {
            return "0s".into();
        }
        return format!("{}ns", d.as_nanos());
    }
    if d.as_nanos() % 1_000 != 0 {
        return format!("{}ns", d.as_nanos());
    }
    for (per, unit) in [
        (3_600_000_000, "h"),
        (60_000_000, "m"),
        (1_000_000, "s"),
        (1_000, "ms"),
    ] {
        if us % per == 0 {
            return format!("{}{unit}", us / per);
        }
    }
    format!("{us}us")
}

/// A duration as written in the file.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dur(pub(super) Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurVisitor)
    }
}

pub(super) struct DurVisitor;

impl Visitor<'_> for DurVisitor {
    type Value = Dur;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration string like \"10ms\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
        parse_duration(v).map(Dur).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
        Err(E::custom(format!(
            "a duration needs a unit: write \"{v}ms\" or \"{v}s\", not {v}"
        )))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
        Err(E::custom(format!(
            "a duration needs a unit: write \"{v}ms\" or \"{v}s\", not {v}"
        )))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
        Err(E::custom(format!(
            "a duration needs a unit and a whole number: write e.g. \"500ms\", not {v}"
        )))
    }
}

// ---------------------------------------------------------------------------------------
// Raw (as written) structures
// ---------------------------------------------------------------------------------------

/// Deserializes any `FromStr<Err = String>` type from a TOML string.
pub(super) struct FromStrVisitor<T> {
    pub(super) expecting: &'static str,
    pub(super) _t: std::marker::PhantomData<T>,
}

impl<T> FromStrVisitor<T> {
    pub(super) fn new(expecting: &'static str) -> Self {
        FromStrVisitor {
            expecting,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: FromStr<Err = String>> Visitor<'_> for FromStrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

/// A socket address as written: `"192.0.2.1:4800"` or `"[2001:db8::1]:4800"`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Addr(pub(super) SocketAddr);

impl FromStr for Addr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Addr).map_err(|_| {
            format!(
                "invalid socket address \"{s}\": expected IP:PORT, e.g. \"192.0.2.1:4800\" or \"[2001:db8::1]:4800\" (host names are not resolved)"
            )
        })
    }
}

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<Addr>::new(
            "a socket address string like \"192.0.2.1:4800\"",
        ))
    }
}

/// A ratio written as a percentage (`"1%"`, `"0.5%"`), in millionths.
#[derive(Debug, Clone, Copy)]
pub(super) struct Percent(pub(super) u32);

impl FromStr for Percent {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("invalid percentage \"{s}\": expected e.g. \"1%\" or \"0.5%\" (0% to 100%)");
        let number = s.trim().strip_suffix('%').ok_or_else(bad)?;
        let v: f64 = number.trim().parse().map_err(|_| bad())?;
        if !(0.0..=100.0).contains(&v) {
            return Err(bad());
        }
        Ok(Percent((v * 10_000.0).round() as u32))
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<Percent>::new(
            "a percentage string like \"1%\"",
        ))
    }
}

/// A rate in bits per second with a unit (`"300Mbit/s"`, `"1.5Gbit/s"`,
/// `"800kbit/s"`, `"2000000bit/s"`), kept in bytes per second.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rate(pub(super) u64);

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "invalid rate \"{s}\": expected a number and a unit, e.g. \"300Mbit/s\", \"1Gbit/s\", \"800kbit/s\""
            )
        };
        let t = s.trim();
        let units = [
            ("Gbit/s", 1e9),
            ("Mbit/s", 1e6),
            ("kbit/s", 1e3),
            ("bit/s", 1.0),
        ];
        let (number, scale) = units
            .iter()
            .find_map(|(u, f)| t.strip_suffix(u).map(|n| (n.trim(), *f)))
            .ok_or_else(bad)?;
        let v: f64 = number.parse().map_err(|_| bad())?;
        let bits = v * scale;
        if !(8e3..=1e12).contains(&bits) {
            return Err(format!(
                "rate \"{s}\" is out of range: 8kbit/s to 1000Gbit/s"
            ));
        }
        Ok(Rate((bits / 8.0).round() as u64))
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<Rate>::new(
            "a rate string like \"300Mbit/s\"",
        ))
    }
}

/// A duration, or `"auto"` for one the gateway chooses.
#[derive(Debug, Clone, Copy)]
pub(super) struct Auto(pub(super) Option<Duration>);

impl FromStr for Auto {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "auto" {
            return Ok(Auto(None));
        }
        parse_duration(s)
            .map(|d| Auto(Some(d)))
            .map_err(|e| format!("{e}; or \"auto\""))
    }
}

impl<'de> Deserialize<'de> for Auto {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<Auto>::new(
            "a duration string like \"20ms\", or \"auto\"",
        ))
    }
}

/// A limit: a duration, or `"off"` for none.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limit(pub(super) Option<Duration>);

impl FromStr for Limit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "off" {
            return Ok(Limit(None));
        }
        parse_duration(s)
            .map(|d| Limit(Some(d)))
            .map_err(|e| format!("{e}; or \"off\" for no limit"))
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<Limit>::new(
            "a duration string like \"50ms\", or \"off\"",
        ))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSla {
    pub(super) max_loss: Option<Percent>,
    pub(super) max_rtt: Option<Limit>,
    pub(super) max_jitter: Option<Limit>,
    pub(super) hold: Option<Dur>,
    pub(super) probe_interval: Option<Dur>,
    pub(super) idle_probe_interval: Option<Limit>,
    pub(super) max_moves_per_minute: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) gateway: RawGateway,
    pub(super) metrics: Option<RawMetrics>,
    #[serde(default)]
    pub(super) bfd: RawBfd,
    #[serde(default)]
    pub(super) peer: Vec<RawPeer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    pub(super) name: String,
    pub(super) control_socket: Option<PathBuf>,
    pub(super) private_key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: Addr,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBfd {
    pub(super) tx_interval: Option<Dur>,
    pub(super) rx_interval: Option<Dur>,
    pub(super) multiplier: Option<u8>,
    pub(super) hop: Option<Hop>,
    pub(super) passive: Option<bool>,
    pub(super) min_ttl: Option<u8>,
    pub(super) auth: Option<RawAuth>,
    pub(super) dscp: Option<Dscp>,
    pub(super) offload: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(rename = "type")]
    pub(super) auth_type: BfdAuthType,
    pub(super) key_id: u8,
    pub(super) secret_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    pub(super) name: String,
    pub(super) tun: String,
    #[serde(default)]
    pub(super) tun_addresses: Vec<Prefix>,
    #[serde(default)]
    pub(super) routes: Vec<Prefix>,
    #[serde(default)]
    pub(super) policy: Policy,
    pub(super) revert_hold: Option<Dur>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) accept_key_file: Option<PathBuf>,
    pub(super) public_key: Option<String>,
    pub(super) mtu: Option<u16>,
    pub(super) route_metric: Option<u32>,
    #[serde(default)]
    pub(super) fast_path: bool,
    pub(super) dscp: Option<Dscp>,
    pub(super) sla: Option<RawSla>,
    pub(super) reorder_wait: Option<Auto>,
    pub(super) fec: Option<String>,
    pub(super) fec_target_loss: Option<Percent>,
    pub(super) fec_max_overhead: Option<Percent>,
    #[serde(default)]
    pub(super) path: Vec<RawPath>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPath {
    pub(super) name: String,
    pub(super) local: Addr,
    pub(super) remote: Addr,
    pub(super) interface: Option<String>,
    pub(super) priority: Option<u32>,
    pub(super) weight: Option<u32>,
    pub(super) bfd: Option<RawBfd>,
    pub(super) sla: Option<RawSla>,
    pub(super) dscp: Option<Dscp>,
    pub(super) rate: Option<Rate>,
}

// ---------------------------------------------------------------------------------------
// Locating errors: byte offsets <-> key paths, via toml_edit's spans
// ---------------------------------------------------------------------------------------

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()
        .get(..end)
        .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
        + 1
}

pub(super) fn deserialize_error(text: &str, file_name: &str, e: &toml::de::Error) -> ConfigError {
    let span = e.span();
    let mut message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let spanned = span.as_ref().and_then(|s| text.get(s.clone()));
    if let Some(what) = spanned.filter(|w| !w.is_empty() && w.len() <= 64 && !w.contains('\n')) {
        if message == "duplicate key" {
            message = format!("duplicate key `{what}`");
        }
    }
    let doc = toml_edit::Document::parse(text).ok();
    let key = match (&doc, &span) {
        (Some(doc), Some(span)) => {
            let mut path = Vec::new();
            find_offset(doc.as_table(), span.start, &mut path);
            if let Some(missing) = missing_field(&message) {
                path.push(k(missing));
            }
            render_key(Some(doc), &path)
        }
        (Some(doc), None) => match missing_field(&message) {
            Some(missing) => render_key(Some(doc), &[k(missing)]),
            None => "syntax".to_string(),
        },
        (None, _) => "syntax".to_string(),
    };
    ConfigError {
        file: file_name.to_string(),
        line: Some(span.map_or(1, |s| line_of(text, s.start))),
        key,
        message,
    }
}

/// `missing field `name`` -> `name`.
pub(super) fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")?
        .split('`')
        .next()
        .filter(|s| !s.is_empty())
}

pub(super) fn contains(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.start <= offset && (offset < s.end || s.is_empty() && s.start == offset))
}

/// Appends to `path` the key path of the deepest key, value or table header containing
/// `offset`. Returns whether anything was found.
pub(super) fn find_offset(
    table: &dyn toml_edit::TableLike,
    offset: usize,
    path: &mut Vec<Seg>,
) -> bool {
    for (name, item) in table.iter() {
        path.push(k(name));
        let key_span = table.key(name).and_then(toml_edit::Key::span);
        if contains(key_span, offset) || find_in_item(item, offset, path) {
            return true;
        }
        path.pop();
    }
    false
}

pub(super) fn find_in_item(item: &toml_edit::Item, offset: usize, path: &mut Vec<Seg>) -> bool {
    use toml_edit::Item;
    match item {
        Item::Value(v) => find_in_value(v, offset, path),
        Item::Table(t) => find_offset(t, offset, path) || contains(t.span(), offset),
        Item::ArrayOfTables(a) => {
            for (i, t) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                if find_offset(t, offset, path) || contains(t.span(), offset) {
                    return true;
                }
                path.pop();
            }
            false
        }
        Item::None => false,
    }
}

pub(super) fn find_in_value(v: &toml_edit::Value, offset: usize, path: &mut Vec<Seg>) -> bool {
    use toml_edit::Value;
    if !contains(v.span(), offset) {
        return false;
    }
    match v {
        Value::InlineTable(t) => {
            find_offset(t, offset, path);
        }
        Value::Array(a) => {
            for (i, e) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                if find_in_value(e, offset, path) {
                    return true;
                }
                path.pop();
            }
        }
        _ => {}
    }
    true
}

/// Follows `path` through the document. Returns the rendered key and the byte offset of
/// the deepest part of the path that exists in the file (the key itself, or else the
/// nearest enclosing table's header).
pub(super) fn locate(
    doc: Option<&toml_edit::Document<&str>>,
    path: &[Seg],
) -> (String, Option<usize>) {
    let key = render_key(doc, path);
    let Some(doc) = doc else {
        return (key, None);
    };
    let mut offset = None;
    let mut node = Node::Item(doc.as_item());
    for seg in path {
        let Some((next, span)) = node.child(seg) else {
            break;
        };
        if let Some(s) = span {
            offset = Some(s.start);
        }
        node = next;
    }
    (key, offset)
}

#[derive(Clone, Copy)]
pub(super) enum Node<'a> {
    Item(&'a toml_edit::Item),
    Value(&'a toml_edit::Value),
    /// An array-of-tables entry.
    Table(&'a toml_edit::Table),
}

impl<'a> Node<'a> {
    fn table_like(self) -> Option<&'a dyn toml_edit::TableLike> {
        match self {
            Node::Item(i) => i.as_table_like(),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn toml_edit::TableLike),
            Node::Table(t) => Some(t as &dyn toml_edit::TableLike),
        }
    }

    fn array_get(self, i: usize) -> Option<(Node<'a>, Option<Range<usize>>)> {
        use toml_edit::{Item, Value};
        match self {
            Node::Item(Item::ArrayOfTables(a)) => a.get(i).map(|t| (Node::Table(t), t.span())),
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => {
                a.get(i).map(|v| (Node::Value(v), v.span()))
            }
            _ => None,
        }
    }

    /// The child at `seg` and the span that best locates it.
    fn child(self, seg: &Seg) -> Option<(Node<'a>, Option<Range<usize>>)> {
        match seg {
            Seg::Key(key) => {
                let (kk, item) = self.table_like()?.get_key_value(key)?;
                let span = kk.span().or_else(|| item.span());
                Some((Node::Item(item), span))
            }
            Seg::Index(i) => self.array_get(*i),
        }
    }

    /// The `name` of an array-of-tables entry, when it is a plain string.
    fn entry_name(self) -> Option<&'a str> {
        self.table_like()?.get("name")?.as_str()
    }
}

/// Renders a key path: keys joined by dots, array-of-tables entries by their `name`
/// (`peer.gcp.path.cci-1.remote`), other indexes as `[i]` (`peer.gcp.routes[1]`).
pub(super) fn render_key(doc: Option<&toml_edit::Document<&str>>, path: &[Seg]) -> String {
    let mut out = String::new();
    let mut node = doc.map(|d| Node::Item(d.as_item()));
    for seg in path {
        let next = node.and_then(|n| n.child(seg)).map(|(n, _)| n);
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&quote_key(key));
            }
            Seg::Index(i) => match next.and_then(Node::entry_name).filter(|n| is_bare(n)) {
                Some(name) => {
                    out.push('.');
                    out.push_str(name);
                }
                None => out.push_str(&format!("[{i}]")),
            },
        }
        node = next;
    }
    if out.is_empty() {
        out.push_str("(top level)");
    }
    out
}

pub(super) fn is_bare(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub(super) fn quote_key(key: &str) -> String {
    if is_bare(key) {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}
