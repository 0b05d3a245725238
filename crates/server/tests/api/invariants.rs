//! Architecture invariants (docs/architecture.md, "Architecture invariants") checked against
//! the real dependency graph (`cargo metadata`) and the sources of the core crates.
//!
//! These tests start no server and need no database. Each failure names the invariant that
//! broke, so a red test tells the reader what to fix rather than just what differs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cargo_metadata::{DependencyKind, Metadata, MetadataCommand, Package, PackageId};

const DOMAIN: &str = "nexplane-domain";
const PORTS: &str = "nexplane-ports";
const APP: &str = "nexplane-app";
const STORE: &str = "nexplane-store";
const CRYPTO: &str = "nexplane-crypto";
const API: &str = "nexplane-api";
const AWS: &str = "nexplane-aws";
const SERVER: &str = "nexplane";
const AGENT: &str = "nexplane-agent";
const TESTING: &str = "nexplane-testing";

const INV8: &str = "docs/architecture.md invariant 8 (the host agent stays small and \
                    permissive): nexplane-agent, installed on managed hosts, links no GPL crate, \
                    no HTTP server, no database and no AWS SDK, even transitively";

const INV1: &str = "docs/architecture.md invariant 1 (the domain does no IO): nexplane-domain \
                    and nexplane-ports depend on no IO crate and no GPL crate, even \
                    transitively; their sources use no std::fs, std::net, system clock or OS \
                    entropy (time and randomness come in as arguments); their public API is \
                    documented";
const INV3: &str = "docs/architecture.md invariant 3 (each adapter owns its technology): only \
                    nexplane-api knows HTTP, only nexplane-store knows SQL, only nexplane-aws \
                    knows AWS (and the test support nexplane-testing, a dev-dependency only, \
                    never linked into a binary), only nexplane-crypto knows key formats; \
                    nexplane-app sees them only through the ports; GPL code (actix-governor) \
                    stays in nexplane-api and the nexplane binary, every crate declares its \
                    licence";

fn first_match<'p>(name: &str, patterns: &[&'p str]) -> Option<&'p str> {
    patterns
        .iter()
        .copied()
        .find(|pattern| matches_pattern(name, pattern))
}

/// True when a crate between the root and the last element of `chain` already matches one
/// of `patterns`: only the crate that brings a forbidden subtree in gets reported.
fn pulled_in_by_match(chain: &[String], patterns: &[&str]) -> bool {
    let between = chain
        .get(1..chain.len().saturating_sub(1))
        .unwrap_or_default();
    between
        .iter()
        .any(|name| first_match(name, patterns).is_some())
}

/// A crate-name pattern: `"tokio"` matches exactly, `"diesel*"` matches a prefix.
fn matches_pattern(name: &str, pattern: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

fn workspace_root() -> PathBuf {
    // crates/server -> the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("CARGO_MANIFEST_DIR has two parents")
        .to_path_buf()
}

fn metadata() -> &'static Metadata {
    static METADATA: OnceLock<Metadata> = OnceLock::new();
    METADATA.get_or_init(|| {
        MetadataCommand::new()
            .manifest_path(workspace_root().join("Cargo.toml"))
            .exec()
            .unwrap_or_else(|e| panic!("cargo metadata failed: {e}"))
    })
}

fn packages_by_id(meta: &Metadata) -> HashMap<&PackageId, &Package> {
    meta.packages.iter().map(|p| (&p.id, p)).collect()
}

fn workspace_packages(meta: &Metadata) -> Vec<&Package> {
    let by_id = packages_by_id(meta);
    meta.workspace_members
        .iter()
        .filter_map(|id| by_id.get(id).copied())
        .collect()
}

fn workspace_package<'m>(meta: &'m Metadata, name: &str) -> &'m Package {
    workspace_packages(meta)
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("workspace crate {name} not found by cargo metadata"))
}

/// Every package reachable from `root` through normal (non-dev, non-build) dependency edges,
/// on any target platform, with the chain of crates that pulls it in. `root` itself is not
/// included.
fn normal_closure<'m>(meta: &'m Metadata, root: &'m PackageId) -> Vec<(&'m Package, Vec<String>)> {
    let by_id = packages_by_id(meta);
    let resolve = meta
        .resolve
        .as_ref()
        .expect("cargo metadata returned no dependency resolution");
    let nodes: HashMap<&PackageId, _> = resolve.nodes.iter().map(|n| (&n.id, n)).collect();

    let name_of = |id: &PackageId| {
        by_id
            .get(id)
            .map_or_else(|| id.repr.clone(), |p| p.name.clone())
    };
    let mut parent: HashMap<&PackageId, &PackageId> = HashMap::new();
    let mut queue = VecDeque::from([root]);
    let mut seen = HashSet::from([root]);
    let mut found = Vec::new();
    while let Some(id) = queue.pop_front() {
        let Some(node) = nodes.get(id) else { continue };
        for dep in &node.deps {
            let normal = dep
                .dep_kinds
                .iter()
                .any(|k| matches!(k.kind, DependencyKind::Normal));
            if normal && seen.insert(&dep.pkg) {
                parent.insert(&dep.pkg, id);
                queue.push_back(&dep.pkg);
            }
        }
    }
    for id in seen.iter().copied().filter(|id| *id != root) {
        let mut chain = vec![name_of(id)];
        let mut cur = id;
        while let Some(p) = parent.get(cur) {
            chain.push(name_of(p));
            cur = p;
        }
        chain.reverse();
        if let Some(pkg) = by_id.get(id) {
            found.push((*pkg, chain));
        }
    }
    found.sort_by(|a, b| a.1.cmp(&b.1));
    found
}

/// Names of the crates a workspace crate declares as normal or build dependencies (dev
/// dependencies are left out: tests may use whatever helps them).
fn direct_dependencies(pkg: &Package) -> BTreeSet<&str> {
    pkg.dependencies
        .iter()
        .filter(|d| !matches!(d.kind, DependencyKind::Development))
        .map(|d| d.name.as_str())
        .collect()
}

/// True when the SPDX licence expression cannot be satisfied without a GPL-family licence
/// (GPL, LGPL, AGPL): `MIT OR LGPL-2.1-or-later` can be taken as MIT, `MIT AND GPL-3.0` cannot.
/// The old `MIT/Apache-2.0` notation counts as `OR`.
fn requires_gpl(license: &str) -> bool {
    let spaced = license
        .replace('(', " ( ")
        .replace(')', " ) ")
        .replace('/', " OR ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let mut pos = 0;
    !permissive_or(&tokens, &mut pos)
}

/// `or := and ("OR" and)*`; true when some alternative avoids GPL.
fn permissive_or(tokens: &[&str], pos: &mut usize) -> bool {
    let mut ok = permissive_and(tokens, pos);
    while tokens
        .get(*pos)
        .is_some_and(|t| t.eq_ignore_ascii_case("OR"))
    {
        *pos += 1;
        ok |= permissive_and(tokens, pos);
    }
    ok
}

/// `and := term ("AND" term)*`; true when every part avoids GPL.
fn permissive_and(tokens: &[&str], pos: &mut usize) -> bool {
    let mut ok = permissive_term(tokens, pos);
    while tokens
        .get(*pos)
        .is_some_and(|t| t.eq_ignore_ascii_case("AND"))
    {
        *pos += 1;
        ok &= permissive_term(tokens, pos);
    }
    ok
}

/// `term := "(" or ")" | licence ["WITH" exception]`.
fn permissive_term(tokens: &[&str], pos: &mut usize) -> bool {
    let Some(token) = tokens.get(*pos) else {
        return true;
    };
    *pos += 1;
    if *token == "(" {
        let ok = permissive_or(tokens, pos);
        if tokens.get(*pos) == Some(&")") {
            *pos += 1;
        }
        return ok;
    }
    if tokens
        .get(*pos)
        .is_some_and(|t| t.eq_ignore_ascii_case("WITH"))
    {
        *pos += 2;
    }
    !token.to_ascii_uppercase().contains("GPL")
}

const CORE_FORBIDDEN: &[&str] = &[
    "tokio*",
    "diesel*",
    "actix*",
    "rusoto*",
    "jsonwebtoken",
    "reqwest",
    "hyper*",
    "aws-lc*",
];

fn assert_core_crate_is_pure(crate_name: &str) {
    let meta = metadata();
    let pkg = workspace_package(meta, crate_name);
    let mut problems = Vec::new();
    for (dep, chain) in normal_closure(meta, &pkg.id) {
        if let Some(pattern) = first_match(&dep.name, CORE_FORBIDDEN) {
            if !pulled_in_by_match(&chain, CORE_FORBIDDEN) {
                problems.push(format!(
                    "{crate_name} depends on IO crate {} (matches `{pattern}`) via {}; {INV1}",
                    dep.name,
                    chain.join(" -> ")
                ));
            }
        }
        if let Some(license) = dep.license.as_deref() {
            if requires_gpl(license) {
                problems.push(format!(
                    "{crate_name} depends on {} licensed `{license}` via {}; {INV1}",
                    dep.name,
                    chain.join(" -> ")
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_agent_links_no_gpl_crate_and_no_server_technology() {
    const NOT_ON_HOSTS: &[&str] = &["actix*", "paperclip*", "diesel*", "rusoto*", "r2d2"];
    let meta = metadata();
    let pkg = workspace_package(meta, AGENT);
    let mut problems = Vec::new();
    for (dep, chain) in normal_closure(meta, &pkg.id) {
        if let Some(pattern) = first_match(&dep.name, NOT_ON_HOSTS) {
            problems.push(format!(
                "{AGENT} depends on {} (matches `{pattern}`) via {}; {INV8}",
                dep.name,
                chain.join(" -> ")
            ));
        }
        if let Some(license) = dep.license.as_deref().filter(|l| requires_gpl(l)) {
            problems.push(format!(
                "{AGENT} depends on {} licensed `{license}` via {}; {INV8}",
                dep.name,
                chain.join(" -> ")
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn domain_depends_on_no_io_crate_and_no_gpl_crate() {
    assert_core_crate_is_pure(DOMAIN);
}

#[test]
fn ports_depend_on_no_io_crate_and_no_gpl_crate() {
    assert_core_crate_is_pure(PORTS);
}

#[test]
fn app_sees_adapters_only_through_ports() {
    let meta = metadata();
    let app = workspace_package(meta, APP);
    let forbidden = [
        "diesel*",
        "actix*",
        "rusoto*",
        "jsonwebtoken",
        "paperclip*",
        STORE,
        CRYPTO,
        API,
        AWS,
    ];
    let problems: Vec<String> = normal_closure(meta, &app.id)
        .into_iter()
        .filter(|(_, chain)| !pulled_in_by_match(chain, &forbidden))
        .filter_map(|(dep, chain)| {
            first_match(&dep.name, &forbidden).map(|p| {
                format!(
                    "{APP} depends on {} (matches `{p}`) via {}; {INV3}",
                    dep.name,
                    chain.join(" -> ")
                )
            })
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

const HTTP: &str = "only nexplane-api knows HTTP (the server binary wires it)";
const SQL: &str = "only nexplane-store knows SQL";
const AWS_SDK: &str =
    "only nexplane-aws knows AWS (and nexplane-testing, the test support that seeds the emulator)";
const KEYS: &str = "only nexplane-crypto knows key formats";

/// (crate pattern, the workspace crates allowed to declare it, why)
const OWNERSHIP: &[(&str, &[&str], &str)] = &[
    ("actix-web", &[API, SERVER], HTTP),
    ("actix-http", &[API, SERVER], HTTP),
    ("paperclip*", &[API, SERVER], HTTP),
    ("actix-governor", &[API, SERVER], HTTP),
    ("diesel*", &[STORE], SQL),
    ("rusoto*", &[AWS, TESTING], AWS_SDK),
    ("jsonwebtoken", &[CRYPTO], KEYS),
    ("rust-argon2", &[CRYPTO], KEYS),
    ("argon2", &[CRYPTO], KEYS),
    ("aes-gcm", &[CRYPTO], KEYS),
];

#[test]
fn adapter_crates_own_their_technology() {
    let meta = metadata();
    let mut problems = Vec::new();
    for pkg in workspace_packages(meta) {
        for dep in direct_dependencies(pkg) {
            for (pattern, owners, why) in OWNERSHIP {
                if matches_pattern(dep, pattern) && !owners.contains(&pkg.name.as_str()) {
                    problems.push(format!(
                        "{} declares a dependency on {dep}, but {why} (allowed in: {}); {INV3}",
                        pkg.name,
                        owners.join(", ")
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn test_support_is_only_a_dev_dependency() {
    // nexplane-testing may know AWS (rusoto) because no binary or library links it: every
    // workspace crate that uses it declares it under [dev-dependencies].
    let meta = metadata();
    let problems: Vec<String> = workspace_packages(meta)
        .into_iter()
        .filter(|pkg| direct_dependencies(pkg).contains(TESTING))
        .map(|pkg| {
            format!(
                "{} declares {TESTING} as a normal or build dependency, but test support is \
                 for [dev-dependencies] only; {INV3}",
                pkg.name
            )
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_workspace_crate_declares_a_licence() {
    let meta = metadata();
    let problems: Vec<String> = workspace_packages(meta)
        .into_iter()
        .filter(|p| p.license.as_deref().is_none_or(|l| l.trim().is_empty()))
        .map(|p| {
            format!(
                "{} declares no `license` in {}; {INV3}",
                p.name, p.manifest_path
            )
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn gpl_stays_in_the_http_layer_and_the_binary() {
    // Only the crates that link actix-governor may be GPL; everything else stays permissive so
    // the core can be embedded.
    let meta = metadata();
    let problems: Vec<String> = workspace_packages(meta)
        .into_iter()
        .filter(|p| ![API, SERVER].contains(&p.name.as_str()))
        .filter(|p| p.license.as_deref().is_some_and(requires_gpl))
        .map(|p| {
            format!(
                "{} is licensed `{}`; {INV3}",
                p.name,
                p.license.as_deref().unwrap_or_default()
            )
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Source scan of the core crates.

/// Code that reaches the outside world (files, sockets, async runtime) or reads the clock or
/// an entropy source directly. The core takes time and randomness as arguments instead.
const FORBIDDEN_SOURCE: &[(&str, &str)] = &[
    ("std::fs", "file IO"),
    ("std::net", "network IO"),
    ("tokio", "an async runtime"),
    ("SystemTime::now", "reads the clock"),
    ("Instant::now", "reads the clock"),
    ("OffsetDateTime::now", "reads the clock"),
    ("Utc::now", "reads the clock"),
    ("thread_rng", "reads an entropy source"),
    ("OsRng", "reads an entropy source"),
    ("getrandom", "reads an entropy source"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The code part of a line: everything before a `//` comment (doc comments included).
fn code_of(line: &str) -> &str {
    line.find("//").map_or(line, |i| &line[..i])
}

/// Modules named inside `std::{…}` groups on this line, e.g. `use std::{fs, io};` → fs, io.
fn std_group_members(code: &str) -> Vec<String> {
    let mut members = Vec::new();
    let mut rest = code;
    while let Some(start) = rest.find("std::{") {
        let after = &rest[start + "std::{".len()..];
        let end = after.find('}').unwrap_or(after.len());
        members.extend(
            after[..end]
                .split(',')
                .filter_map(|m| m.split("::").next())
                .filter_map(|m| m.split_whitespace().next())
                .map(str::to_string),
        );
        rest = &after[end..];
    }
    members
}

fn scan_core_sources(crate_dir: &str, crate_name: &str) -> Vec<String> {
    let src = workspace_root().join(crate_dir).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        !files.is_empty(),
        "no sources found under {}",
        src.display()
    );
    let mut problems = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        for (n, line) in text.lines().enumerate() {
            let code = code_of(line);
            let mut hits: Vec<(&str, &str)> = FORBIDDEN_SOURCE
                .iter()
                .filter(|(needle, _)| code.contains(needle))
                .copied()
                .collect();
            for member in std_group_members(code) {
                match member.as_str() {
                    "fs" => hits.push(("std::{fs}", "file IO")),
                    "net" => hits.push(("std::{net}", "network IO")),
                    _ => {}
                }
            }
            for (needle, what) in hits {
                problems.push(format!(
                    "{}:{}: {crate_name} uses `{needle}` ({what}): `{}`; {INV1}",
                    file.display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    problems
}

#[test]
fn domain_and_ports_sources_do_no_io_and_read_no_clock_or_entropy() {
    let mut problems = scan_core_sources("crates/domain", DOMAIN);
    problems.extend(scan_core_sources("crates/ports", PORTS));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn has_deny_missing_docs(lib_rs: &Path) -> bool {
    let text = std::fs::read_to_string(lib_rs)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", lib_rs.display()));
    text.lines().map(str::trim).any(|line| {
        (line.starts_with("#![deny(") || line.starts_with("#![forbid("))
            && line.contains("missing_docs")
    })
}

#[test]
fn domain_and_ports_deny_missing_docs() {
    let root = workspace_root();
    let problems: Vec<String> = ["crates/domain/src/lib.rs", "crates/ports/src/lib.rs"]
        .into_iter()
        .filter(|lib| !has_deny_missing_docs(&root.join(lib)))
        .map(|lib| format!("{lib} lacks `#![deny(missing_docs)]`; {INV1}"))
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checks_themselves_work() {
    assert!(matches_pattern("diesel_migrations", "diesel*"));
    assert!(matches_pattern("tokio", "tokio"));
    assert!(!matches_pattern("tokio-util", "tokio"));
    assert!(requires_gpl("GPL-3.0-or-later"));
    assert!(requires_gpl("LGPL-2.1-only"));
    assert!(!requires_gpl("MIT OR Apache-2.0 OR LGPL-2.1-or-later"));
    assert!(!requires_gpl("MIT"));
    assert!(!requires_gpl("MIT/Apache-2.0"));
    assert!(requires_gpl("(MIT OR Apache-2.0) AND GPL-2.0-only"));
    assert!(!requires_gpl("(MIT OR GPL-2.0-only) AND Apache-2.0"));
    assert!(requires_gpl(
        "GPL-2.0-or-later WITH Classpath-exception-2.0"
    ));
    assert!(!requires_gpl(
        "ISC AND (Apache-2.0 OR ISC) AND OpenSSL AND (Apache-2.0 OR ISC OR MIT-0)"
    ));
    assert_eq!(
        std_group_members("use std::{fs::File, io, net as n};"),
        vec!["fs", "io", "net"]
    );
    let chain: Vec<String> = ["app", "ports", "actix-web", "actix-http"]
        .map(String::from)
        .to_vec();
    assert!(pulled_in_by_match(&chain, &["actix*"]));
    assert!(!pulled_in_by_match(&chain[..3], &["actix*"]));
    assert_eq!(code_of("let a = 1; // tokio"), "let a = 1; ");
}
