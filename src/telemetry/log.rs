//! Log lines as JSON objects (`crosslink run --log-format json`), for log
//! shippers that want fields rather than text. One object per line:
//! `{"ts":1790000000.123,"level":"WARN","message":"failover","peer":"gcp",...}`,
//! with the event's fields keeping their types.

use serde_json::{Map, Number, Value};
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The JSON line formatter.
pub struct JsonLines;

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(
            field.name().to_string(),
            Value::String(format!("{value:?}")),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_string(), Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), Value::Bool(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.0.insert(field.name().to_string(), v);
    }
}

/// Renders one event as a JSON object.
pub fn render(level: &tracing::Level, unix: f64, event: &Event<'_>) -> String {
    let mut fields = Fields(Map::new());
    fields.0.insert(
        "ts".into(),
        Number::from_f64((unix * 1000.0).round() / 1000.0).map_or(Value::Null, Value::Number),
    );
    fields
        .0
        .insert("level".into(), Value::String(level.to_string()));
    event.record(&mut fields);
    Value::Object(fields.0).to_string()
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        writeln!(writer, "{}", render(event.metadata().level(), unix, event))
    }
}
