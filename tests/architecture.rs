//! The layout's rules, checked on the sources: the core stays sans-IO and the
//! test support stays out of the daemon.
//!
//! - `src/core/` (wire views, BFD, steering, the engine, the per-packet work)
//!   never touches the world: no sockets, files, threads, processes,
//!   environment or printing (`std::fs`, `std::net::UdpSocket`,
//!   `std::thread`, `println!`, ...), no clock (`Instant::now`,
//!   `SystemTime`), and none of the crate's dependencies that do I/O
//!   (tokio, libc, socket2, tun-rs, rtnetlink, tracing, metrics, ...: every
//!   dependency in `Cargo.toml` but the pure ones listed in [`CORE_CRATES`],
//!   so a new dependency is refused in the core until it is listed). Within
//!   the crate it reaches only itself, the typed configuration and the ids
//!   (`crate::core`, `crate::config`, `crate::PathId`, `crate::PeerId`).
//! - `src/config/` reaches only itself and the core.
//! - Nothing of the daemon (`src/core`, `src/config`, `src/io`,
//!   `src/telemetry`, `src/setup`, `src/lib.rs`) reaches the lab (`src/lab/`: test support,
//!   the demo, the probe and the junk generator).
//!
//! The files are parsed with `syn`, following the `mod` declarations from
//! each tree's root (so every file of the tree is read, and only those);
//! every path is looked at, in `use` trees, expressions, types and the
//! arguments of macros, with `self::` and `super::` resolved against the
//! module that holds them. Test code (`#[cfg(test)]` items and modules) may
//! use the clock as a base time, and is not checked.
//!
//! Why a test over the sources rather than a crate of its own for the core
//! (quinn's `quinn-proto`): a separate crate would keep tokio and libc out by
//! its dependency list, but not `std::fs`, `std::thread` or the clock, which
//! are in `std`; this check covers both, and keeps one crate, one
//! `Cargo.toml` and crate-private items where the shell and the core meet.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use syn::punctuated::Punctuated;
use syn::visit::{self, Visit};
use syn::{Attribute, Expr, ImplItem, Item, Token, UseTree};

/// Dependencies the core may use: pure computation on values.
const CORE_CRATES: &[&str] = &[
    "etherparse",
    "bytes",
    "parking_lot",
    "serde",
    "thiserror",
    "arc_swap",
    "md_5",
    "md5",
    "sha1",
    "zeroize",
    "ring",
    "base64",
    "curve25519_dalek",
    "snow",
    "reed_solomon_simd",
];

/// Paths of `std` that reach the world or the clock.
const WORLD: &[(&str, &str)] = &[
    ("std::fs", "opens files"),
    ("std::net::UdpSocket", "opens sockets"),
    ("std::net::TcpStream", "opens sockets"),
    ("std::net::TcpListener", "opens sockets"),
    ("std::net::ToSocketAddrs", "resolves names"),
    ("std::os", "uses file descriptors"),
    ("std::io", "does I/O"),
    ("std::thread", "starts or sleeps threads"),
    ("std::process", "runs processes"),
    ("std::env", "reads the environment"),
    ("std::time::SystemTime", "reads the wall clock"),
    ("std::time::UNIX_EPOCH", "reads the wall clock"),
    ("std::time::Instant::now", "reads the clock"),
    ("Instant::now", "reads the clock"),
    ("SystemTime", "reads the wall clock"),
];

/// Macros that print.
const PRINTING: &[&str] = &["println", "eprintln", "print", "eprint", "dbg"];

/// What one tree may reach.
struct Rules {
    /// Refused first path segments (crates), with why.
    crates: BTreeSet<String>,
    /// `crate::<name>` allowed (empty: any but `lab`).
    crate_items: &'static [&'static str],
    /// Whether std's world, the clock and printing are refused.
    sans_io: bool,
}

#[derive(Debug, PartialEq, Eq)]
struct Violation {
    file: PathBuf,
    line: usize,
    path: String,
    why: String,
}

struct Checker<'a> {
    rules: &'a Rules,
    file: PathBuf,
    /// The module holding the code being visited, from the crate root.
    module: Vec<String>,
    found: Vec<Violation>,
}

/// Whether the attributes hold `#[cfg(test)]` (or a `cfg` that needs `test`).
fn is_cfg_test(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|a| match &a.meta {
        syn::Meta::List(list) if list.path.is_ident("cfg") => {
            let text = list.tokens.to_string();
            text.split(|c: char| !c.is_alphanumeric() && c != '_')
                .any(|w| w == "test")
                && !text.contains("not")
        }
        _ => false,
    })
}

fn item_attrs(item: &Item) -> &[Attribute] {
    match item {
        Item::Const(i) => &i.attrs,
        Item::Enum(i) => &i.attrs,
        Item::ExternCrate(i) => &i.attrs,
        Item::Fn(i) => &i.attrs,
        Item::ForeignMod(i) => &i.attrs,
        Item::Impl(i) => &i.attrs,
        Item::Macro(i) => &i.attrs,
        Item::Mod(i) => &i.attrs,
        Item::Static(i) => &i.attrs,
        Item::Struct(i) => &i.attrs,
        Item::Trait(i) => &i.attrs,
        Item::TraitAlias(i) => &i.attrs,
        Item::Type(i) => &i.attrs,
        Item::Union(i) => &i.attrs,
        Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

impl Checker<'_> {
    fn check(&mut self, segments: Vec<String>, line: usize) {
        let Some(first) = segments.first() else {
            return;
        };
        // Resolve `self::` and `super::` against the module that holds the code.
        let absolute: Vec<String> = match first.as_str() {
            "crate" => segments.clone(),
            "self" | "super" => {
                let mut at = self.module.clone();
                let mut rest = segments.as_slice();
                while let Some((s, tail)) = rest.split_first() {
                    match s.as_str() {
                        "self" => {}
                        "super" => {
                            at.pop();
                        }
                        _ => break,
                    }
                    rest = tail;
                }
                std::iter::once("crate".to_string())
                    .chain(at)
                    .chain(rest.iter().cloned())
                    .collect()
            }
            _ => segments.clone(),
        };
        let text = absolute.join("::");
        if absolute.first().map(String::as_str) == Some("crate") {
            let Some(item) = absolute.get(1) else {
                return;
            };
            let allowed = if self.rules.crate_items.is_empty() {
                item != "lab"
            } else {
                self.rules.crate_items.contains(&item.as_str())
            };
            if !allowed {
                self.push(line, text, format!("reaches `crate::{item}`"));
            }
            return;
        }
        if self.rules.crates.contains(first) {
            self.push(line, text, format!("uses the crate `{first}`"));
            return;
        }
        if self.rules.sans_io {
            for (prefix, why) in WORLD {
                let p: Vec<&str> = prefix.split("::").collect();
                let hit = absolute.len() >= p.len() && absolute.iter().zip(&p).all(|(a, b)| a == b)
                    || (absolute.first().map(String::as_str) == Some("core")
                        && prefix.starts_with("std::")
                        && absolute.len() >= p.len()
                        && absolute
                            .iter()
                            .skip(1)
                            .zip(p.iter().skip(1))
                            .all(|(a, b)| a == b));
                if hit {
                    self.push(line, text, (*why).to_string());
                    return;
                }
            }
        }
    }

    fn push(&mut self, line: usize, path: String, why: String) {
        self.found.push(Violation {
            file: self.file.clone(),
            line,
            path,
            why,
        });
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &UseTree) {
        match tree {
            UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            UseTree::Name(n) => {
                let mut full = prefix.clone();
                if n.ident != "self" {
                    full.push(n.ident.to_string());
                }
                self.check(full, n.ident.span().start().line);
            }
            UseTree::Rename(r) => {
                let mut full = prefix.clone();
                full.push(r.ident.to_string());
                self.check(full, r.ident.span().start().line);
            }
            UseTree::Glob(g) => {
                self.check(prefix.clone(), g.star_token.span.start().line);
            }
            UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Checker<'_> {
    fn visit_item(&mut self, item: &'ast Item) {
        if is_cfg_test(item_attrs(item)) {
            return;
        }
        visit::visit_item(self, item);
    }

    fn visit_impl_item(&mut self, item: &'ast ImplItem) {
        if let ImplItem::Fn(f) = item {
            if is_cfg_test(&f.attrs) {
                return;
            }
        }
        visit::visit_impl_item(self, item);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        // Inline modules: the code inside is one level deeper.
        if m.content.is_some() {
            self.module.push(m.ident.to_string());
            visit::visit_item_mod(self, m);
            self.module.pop();
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut prefix = Vec::new();
        self.use_tree(&mut prefix, &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        let line = p
            .segments
            .first()
            .map_or(0, |s| s.ident.span().start().line);
        self.check(segments, line);
        visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        let name = m
            .path
            .segments
            .last()
            .map(|s| s.ident.to_string())
            .unwrap_or_default();
        if self.rules.sans_io && PRINTING.contains(&name.as_str()) {
            let line = m
                .path
                .segments
                .first()
                .map_or(0, |s| s.ident.span().start().line);
            self.push(line, format!("{name}!"), "prints".into());
        }
        // The arguments of expression-like macros (format!, assert!, vec!, ...).
        if let Ok(args) = m.parse_body_with(Punctuated::<Expr, Token![,]>::parse_terminated) {
            for e in &args {
                self.visit_expr(e);
            }
        }
        visit::visit_macro(self, m);
    }
}

/// The file of module `name` declared in `file` (`foo.rs` -> `foo/name.rs`,
/// `mod.rs` or `lib.rs` -> `name.rs` beside it; `name/mod.rs` either way).
fn module_file(file: &Path, name: &str) -> Option<PathBuf> {
    let dir = file.parent()?;
    let stem = file.file_stem()?.to_str()?;
    let base = if stem == "mod" || stem == "lib" || stem == "main" {
        dir.to_path_buf()
    } else {
        dir.join(stem)
    };
    [
        base.join(format!("{name}.rs")),
        base.join(name).join("mod.rs"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// Checks `file` (module path `module`) and every non-test module it
/// declares, recursively.
fn check_tree(
    rules: &Rules,
    file: &Path,
    module: Vec<String>,
    found: &mut Vec<Violation>,
    files: &mut Vec<PathBuf>,
) {
    let text =
        std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", file.display()));
    found.extend(check_source(rules, file, &module, &ast));
    files.push(file.to_path_buf());
    for item in &ast.items {
        if let Item::Mod(m) = item {
            if m.content.is_none() && !is_cfg_test(&m.attrs) {
                let name = m.ident.to_string();
                let child = module_file(file, &name)
                    .unwrap_or_else(|| panic!("no file for `mod {name}` in {}", file.display()));
                let mut path = module.clone();
                path.push(name);
                check_tree(rules, &child, path, found, files);
            }
        }
    }
}

fn check_source(rules: &Rules, file: &Path, module: &[String], ast: &syn::File) -> Vec<Violation> {
    let mut c = Checker {
        rules,
        file: file.to_path_buf(),
        module: module.to_vec(),
        found: Vec::new(),
    };
    c.visit_file(ast);
    c.found
}

/// The crate's dependencies (library names) less the core's pure ones.
fn io_crates() -> BTreeSet<String> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    let doc: toml::Table = toml::from_str(&manifest).expect("Cargo.toml parses");
    let deps = doc
        .get("dependencies")
        .and_then(|d| d.as_table())
        .expect("[dependencies]");
    deps.keys()
        .map(|k| k.replace('-', "_"))
        .filter(|k| !CORE_CRATES.contains(&k.as_str()))
        .collect()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn core_rules() -> Rules {
    Rules {
        crates: io_crates(),
        crate_items: &["core", "config", "PathId", "PeerId"],
        sans_io: true,
    }
}

fn report(found: &[Violation]) -> String {
    found
        .iter()
        .map(|v| {
            format!(
                "{}:{}: `{}` {}",
                v.file.strip_prefix(root()).unwrap_or(&v.file).display(),
                v.line,
                v.path,
                v.why
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn check(rules: &Rules, root_file: &str, module: &[&str]) -> (Vec<Violation>, Vec<PathBuf>) {
    let mut found = Vec::new();
    let mut files = Vec::new();
    let module = module.iter().map(|s| s.to_string()).collect();
    check_tree(
        rules,
        &root().join(root_file),
        module,
        &mut found,
        &mut files,
    );
    (found, files)
}

#[test]
fn the_core_is_sans_io() {
    let (found, files) = check(&core_rules(), "src/core/mod.rs", &["core"]);
    assert!(
        files.len() >= 15,
        "the core's module tree was not followed: {files:?}"
    );
    assert!(
        found.is_empty(),
        "the core must not do I/O, read the clock or reach the shell (src/core/mod.rs):\n{}",
        report(&found)
    );
}

#[test]
fn the_config_reaches_only_the_core() {
    let rules = Rules {
        crates: BTreeSet::new(),
        crate_items: &["config", "core", "PathId", "PeerId"],
        sans_io: false,
    };
    let (found, _) = check(&rules, "src/config/mod.rs", &["config"]);
    assert!(found.is_empty(), "{}", report(&found));
}

#[test]
fn the_daemon_does_not_depend_on_the_lab() {
    let rules = Rules {
        crates: BTreeSet::new(),
        crate_items: &[],
        sans_io: false,
    };
    let mut found = Vec::new();
    for (file, module) in [
        ("src/io/mod.rs", "io"),
        ("src/telemetry/mod.rs", "telemetry"),
        ("src/setup/mod.rs", "setup"),
        ("src/config/mod.rs", "config"),
        ("src/core/mod.rs", "core"),
    ] {
        found.extend(check(&rules, file, &[module]).0);
    }
    // lib.rs itself, without following its modules (the lab is one of them).
    let text = std::fs::read_to_string(root().join("src/lib.rs")).expect("lib.rs");
    let ast = syn::parse_file(&text).expect("lib.rs parses");
    found.extend(check_source(&rules, &root().join("src/lib.rs"), &[], &ast));
    assert!(
        found.is_empty(),
        "test support (src/lab) is reached from the daemon:\n{}",
        report(&found)
    );
}

/// The checker itself: what it must refuse, and what it must let through.
#[test]
fn the_check_sees_each_kind_of_violation() {
    let rules = core_rules();
    let cases: &[(&str, &str)] = &[
        (
            "fn f() { let _ = std::time::Instant::now(); }",
            "reads the clock",
        ),
        (
            "use std::time::Instant; fn f() { Instant::now(); }",
            "reads the clock",
        ),
        (
            "fn f() { let _ = std::time::SystemTime::now(); }",
            "wall clock",
        ),
        ("use std::net::{IpAddr, UdpSocket};", "opens sockets"),
        ("fn f() { std::thread::spawn(|| ()); }", "threads"),
        (
            "fn f() -> bool { format!(\"{}\", std::fs::read(\"x\").is_ok()).is_empty() }",
            "opens files",
        ),
        ("fn f() { println!(\"x\"); }", "prints"),
        ("use tokio::net::UdpSocket;", "crate `tokio`"),
        ("fn f() { unsafe { libc::close(3) }; }", "crate `libc`"),
        ("use crate::io::clock;", "`crate::io`"),
        ("use crate::lab::Lab;", "`crate::lab`"),
        ("use crate::telemetry::PathCounters;", "`crate::telemetry`"),
        ("use super::super::io::sys;", "`crate::io`"),
        (
            "mod inner { fn f() { let _ = super::super::super::lab::is_root(); } }",
            "`crate::lab`",
        ),
    ];
    for (source, why) in cases {
        let ast = syn::parse_file(source).expect("case parses");
        let found = check_source(
            &rules,
            Path::new("case.rs"),
            &["core".into(), "steer".into()],
            &ast,
        );
        assert!(
            found
                .iter()
                .any(|v| v.why.contains(why) || v.path.contains(why.trim_matches('`'))),
            "`{source}` must be refused ({why}); found {found:?}"
        );
    }
    let clean: &[&str] = &[
        "use std::net::{IpAddr, SocketAddr}; use std::time::{Duration, Instant};",
        "fn f(now: Instant) -> Instant { now + Duration::from_millis(10) }",
        "use crate::core::wire::overlay::Header; use crate::config::Policy; use crate::PathId;",
        "use super::session::Session; use ring::hkdf; use thiserror::Error;",
        "#[cfg(test)] mod tests { fn t() { let _ = std::time::Instant::now(); println!(); } }",
        "struct S; impl S { #[cfg(test)] fn t() { std::thread::sleep(Default::default()); } }",
    ];
    for source in clean {
        let ast = syn::parse_file(source).expect("case parses");
        let found = check_source(
            &rules,
            Path::new("case.rs"),
            &["core".into(), "steer".into()],
            &ast,
        );
        assert!(found.is_empty(), "`{source}` is allowed; found {found:?}");
    }
}
