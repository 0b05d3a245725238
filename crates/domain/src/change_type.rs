//! The change-type catalog (api.md §6.3 and §7.3) and a small validator for change targets.
//!
//! A change type names what a change request does (`rotate_iam_access_key`, `agent_write_file`,
//! …), which kind of target it takes (a JSON Schema object), its base risk and whether it can
//! be rolled back. [`builtin_catalog`] lists the types the server ships with; `GET /change-types`
//! serves exactly this list.
//!
//! [`validate_target`] checks a target against a schema, supporting the subset of JSON Schema
//! the catalog uses: `type` (`object`, `string`, `integer`, `number`, `boolean`, `array`),
//! `properties`, `required`, `additionalProperties` (`false` or a schema), `enum`, `const`,
//! `minLength`/`maxLength` (in characters), `pattern` (a regular-expression subset, see below),
//! `minimum`/`maximum`, `items`, `minItems`/`maxItems`. Other keywords are ignored, as JSON
//! Schema does with unknown keywords.
//!
//! Supported `pattern` syntax: literals, `.`, `^`, `$`, escapes (`\d`, `\w`, `\s`, `\.` and any
//! other escaped punctuation), character classes with ranges and negation (`[a-z0-9_-]`,
//! `[^/]`), groups with alternation (`(aws|[0-9]{12})`), and the quantifiers `?`, `*`, `+`,
//! `{n}`, `{n,}`, `{n,m}`. As in JSON Schema a pattern is not implicitly anchored. A pattern
//! outside this subset is ignored (every built-in pattern is inside it, which a test checks).
//!
//! ```
//! use nexplane_domain::change_type::{find_builtin, RollbackKind};
//! use serde_json::json;
//!
//! let ct = find_builtin("rotate_iam_access_key").unwrap();
//! assert_eq!(ct.base_risk, 5);
//! assert_eq!(ct.rollback, RollbackKind::Automatic);
//! assert!(ct.validate_target(&json!({"iam_user": "prod-deploy"})).is_ok());
//!
//! let errors = ct.validate_target(&json!({"iam_usr": "prod-deploy"})).unwrap_err();
//! let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
//! assert_eq!(fields, ["target.iam_user", "target.iam_usr"]);
//! ```

use crate::FieldError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::sync::LazyLock;

/// What a change type acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectorType {
    /// An `aws` connector (the change request names a `connector_id`).
    Aws,
    /// A host agent (no connector; the target names an `agent_id`).
    Agent,
}

impl ConnectorType {
    /// The name used in the API: `aws` or `agent`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectorType::Aws => "aws",
            ConnectorType::Agent => "agent",
        }
    }
}

/// Whether a change type can be rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackKind {
    /// The execution engine can undo the applied steps.
    Automatic,
    /// There is no rollback (e.g. deleting an access key).
    None,
}

/// A change type of the catalog, as listed by `GET /change-types`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeType {
    /// Unique name, e.g. `rotate_iam_access_key`.
    pub name: String,
    /// What it acts on.
    pub connector_type: ConnectorType,
    /// One-line description for people.
    pub description: String,
    /// JSON Schema (an object schema) of the change request's `target`.
    pub target_schema: Value,
    /// Base risk, 1..=10, before environment and rollback factors.
    pub base_risk: u8,
    /// Whether the change can be rolled back.
    pub rollback: RollbackKind,
}

impl ChangeType {
    /// Whether the change can be rolled back.
    pub fn has_rollback(&self) -> bool {
        self.rollback == RollbackKind::Automatic
    }

    /// Checks a change request `target` against [`ChangeType::target_schema`] plus the rules a
    /// schema cannot express (port ranges of security-group rules, `..` in agent paths).
    /// Field paths start with `target`, e.g. `target.iam_user`.
    pub fn validate_target(&self, target: &Value) -> Result<(), Vec<FieldError>> {
        let mut errors = match validate_target(&self.target_schema, target) {
            Ok(()) => Vec::new(),
            Err(e) => e,
        };
        if errors.is_empty() {
            self.cross_field_checks(target, &mut errors);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn cross_field_checks(&self, target: &Value, errors: &mut Vec<FieldError>) {
        let get_int = |k: &str| target.get(k).and_then(Value::as_i64);
        if self.target_schema.pointer("/properties/protocol").is_some() {
            let protocol = target.get("protocol").and_then(Value::as_str).unwrap_or("");
            if let (Some(from), Some(to)) = (get_int("from_port"), get_int("to_port")) {
                match protocol {
                    "tcp" | "udp" => {
                        if from < 0 {
                            errors.push(FieldError::new(
                                "target.from_port",
                                "must be between 0 and 65535 for tcp and udp",
                            ));
                        } else if to < from {
                            errors.push(FieldError::new(
                                "target.to_port",
                                "must be at least from_port",
                            ));
                        }
                    }
                    "icmp" => {
                        for (k, v) in [("from_port", from), ("to_port", to)] {
                            if v > 255 {
                                errors.push(FieldError::new(
                                    format!("target.{k}"),
                                    "must be an ICMP type or code (-1 to 255)",
                                ));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if self.connector_type == ConnectorType::Agent {
            if let Some(path) = target.get("path").and_then(Value::as_str) {
                if path.split('/').any(|seg| seg == "." || seg == "..") || path.contains('\0') {
                    errors.push(FieldError::new(
                        "target.path",
                        "must be a normalized absolute path (no `.` or `..` segments)",
                    ));
                }
            }
        }
    }
}

/// The built-in catalog: the eleven AWS change types of api.md §6.3 and the two agent change
/// types of §7.3, in that order.
pub fn builtin_catalog() -> &'static [ChangeType] {
    static CATALOG: LazyLock<Vec<ChangeType>> = LazyLock::new(build_catalog);
    &CATALOG
}

/// A built-in change type by name.
pub fn find_builtin(name: &str) -> Option<&'static ChangeType> {
    builtin_catalog().iter().find(|ct| ct.name == name)
}

// ---------------------------------------------------------------------------------------------
// The catalog

const IAM_USER_PATTERN: &str = r"^[\w+=,.@-]{1,64}$";
const ACCESS_KEY_PATTERN: &str = r"^[A-Z0-9]{16,128}$";
const POLICY_ARN_PATTERN: &str = r"^arn:aws(-[a-z]+)*:iam::(aws|[0-9]{12}):policy/[\w+=,.@/-]+$";
const INSTANCE_ID_PATTERN: &str = r"^i-([0-9a-f]{8}|[0-9a-f]{17})$";
const GROUP_ID_PATTERN: &str = r"^sg-([0-9a-f]{8}|[0-9a-f]{17})$";
const REGION_PATTERN: &str = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$";
const IPV4_OCTET: &str = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
const AGENT_ID_PATTERN: &str = r"^agt_[0-7][0-9a-hjkmnp-tv-z]{25}$";
const FILE_MODE_PATTERN: &str = r"^[0-7]{3,4}$";
/// Largest `content` of `agent_write_file`, in characters.
pub const AGENT_FILE_CONTENT_MAX_CHARS: u64 = 524_288;

fn iam_user() -> Value {
    json!({
        "type": "string",
        "description": "IAM user name",
        "minLength": 1,
        "maxLength": 64,
        "pattern": IAM_USER_PATTERN,
    })
}

fn access_key_id(description: &str) -> Value {
    json!({
        "type": "string",
        "description": description,
        "minLength": 16,
        "maxLength": 128,
        "pattern": ACCESS_KEY_PATTERN,
    })
}

fn policy_arn() -> Value {
    json!({
        "type": "string",
        "description": "ARN of a managed IAM policy",
        "minLength": 20,
        "maxLength": 2048,
        "pattern": POLICY_ARN_PATTERN,
    })
}

fn instance_id() -> Value {
    json!({
        "type": "string",
        "description": "EC2 instance id",
        "pattern": INSTANCE_ID_PATTERN,
    })
}

fn region() -> Value {
    json!({
        "type": "string",
        "description": "AWS region (default: the connector's region)",
        "maxLength": 32,
        "pattern": REGION_PATTERN,
    })
}

fn agent_id() -> Value {
    json!({
        "type": "string",
        "description": "id of the agent that applies the change",
        "pattern": AGENT_ID_PATTERN,
    })
}

fn file_path() -> Value {
    json!({
        "type": "string",
        "description": "absolute path on the host (must lie under one of the agent's allowed_paths)",
        "minLength": 2,
        "maxLength": 4096,
        "pattern": "^/",
    })
}

fn file_mode(description: &str) -> Value {
    json!({
        "type": "string",
        "description": description,
        "pattern": FILE_MODE_PATTERN,
    })
}

fn object_schema(properties: Value, required: &[&str]) -> Value {
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

fn security_group_rule() -> Value {
    let cidr_pattern = format!("^{IPV4_OCTET}(\\.{IPV4_OCTET}){{3}}/(3[0-2]|[12]?[0-9])$");
    let port = |d: &str| {
        json!({
            "type": "integer",
            "description": d,
            "minimum": -1,
            "maximum": 65535,
        })
    };
    object_schema(
        json!({
            "group_id": {
                "type": "string",
                "description": "security group id",
                "pattern": GROUP_ID_PATTERN,
            },
            "protocol": {
                "type": "string",
                "description": "IP protocol (`-1` for all)",
                "enum": ["tcp", "udp", "icmp", "-1"],
            },
            "from_port": port("first port (ICMP type for icmp, -1 for all)"),
            "to_port": port("last port (ICMP code for icmp, -1 for all)"),
            "cidr": {
                "type": "string",
                "description": "IPv4 CIDR block, e.g. 203.0.113.0/24",
                "maxLength": 18,
                "pattern": cidr_pattern,
            },
            "region": region(),
        }),
        &["group_id", "protocol", "from_port", "to_port", "cidr"],
    )
}

fn ct(
    name: &str,
    connector_type: ConnectorType,
    description: &str,
    target_schema: Value,
    base_risk: u8,
    rollback: RollbackKind,
) -> ChangeType {
    ChangeType {
        name: name.to_owned(),
        connector_type,
        description: description.to_owned(),
        target_schema,
        base_risk,
        rollback,
    }
}

fn build_catalog() -> Vec<ChangeType> {
    use ConnectorType::{Agent, Aws};
    use RollbackKind::{Automatic, None};
    let user_and_key = |d: &str| {
        object_schema(
            json!({"iam_user": iam_user(), "access_key_id": access_key_id(d)}),
            &["iam_user", "access_key_id"],
        )
    };
    let user_only = || object_schema(json!({ "iam_user": iam_user() }), &["iam_user"]);
    let user_and_policy = || {
        object_schema(
            json!({"iam_user": iam_user(), "policy_arn": policy_arn()}),
            &["iam_user", "policy_arn"],
        )
    };
    let instance = || {
        object_schema(
            json!({"instance_id": instance_id(), "region": region()}),
            &["instance_id"],
        )
    };
    vec![
        ct(
            "rotate_iam_access_key",
            Aws,
            "Create a new access key for an IAM user and deactivate the old one; the new \
             secret is revealed once to the requester.",
            object_schema(
                json!({
                    "iam_user": iam_user(),
                    "access_key_id": access_key_id(
                        "the key to replace (required when the user has two keys)"
                    ),
                }),
                &["iam_user"],
            ),
            5,
            Automatic,
        ),
        ct(
            "deactivate_iam_access_key",
            Aws,
            "Set an IAM access key to Inactive.",
            user_and_key("the key to deactivate"),
            4,
            Automatic,
        ),
        ct(
            "delete_iam_access_key",
            Aws,
            "Delete an IAM access key that is already Inactive. Cannot be rolled back.",
            user_and_key("the key to delete (must be Inactive)"),
            6,
            None,
        ),
        ct(
            "lock_iam_user",
            Aws,
            "Attach the inline deny-all policy NexplaneLock to an IAM user and deactivate \
             its active access keys.",
            user_only(),
            6,
            Automatic,
        ),
        ct(
            "unlock_iam_user",
            Aws,
            "Remove the NexplaneLock inline policy from an IAM user.",
            user_only(),
            4,
            Automatic,
        ),
        ct(
            "attach_iam_user_policy",
            Aws,
            "Attach a managed policy to an IAM user.",
            user_and_policy(),
            5,
            Automatic,
        ),
        ct(
            "detach_iam_user_policy",
            Aws,
            "Detach a managed policy from an IAM user.",
            user_and_policy(),
            5,
            Automatic,
        ),
        ct(
            "stop_ec2_instance",
            Aws,
            "Stop an EC2 instance.",
            instance(),
            7,
            Automatic,
        ),
        ct(
            "start_ec2_instance",
            Aws,
            "Start an EC2 instance.",
            instance(),
            2,
            Automatic,
        ),
        ct(
            "revoke_security_group_ingress",
            Aws,
            "Revoke exactly one ingress rule of a security group.",
            security_group_rule(),
            6,
            Automatic,
        ),
        ct(
            "authorize_security_group_ingress",
            Aws,
            "Authorize exactly one ingress rule on a security group.",
            security_group_rule(),
            7,
            Automatic,
        ),
        ct(
            "agent_write_file",
            Agent,
            "Write a file atomically on an agent's host, keeping a snapshot of the old \
             content and mode for rollback.",
            object_schema(
                json!({
                    "agent_id": agent_id(),
                    "path": file_path(),
                    "content": {
                        "type": "string",
                        "description": "the new file content (UTF-8 text)",
                        "maxLength": AGENT_FILE_CONTENT_MAX_CHARS,
                    },
                    "mode": file_mode("octal file mode for the written file, e.g. 0644"),
                }),
                &["agent_id", "path", "content"],
            ),
            5,
            Automatic,
        ),
        ct(
            "agent_set_file_mode",
            Agent,
            "Change the mode of a file on an agent's host.",
            object_schema(
                json!({
                    "agent_id": agent_id(),
                    "path": file_path(),
                    "mode": file_mode("the new octal file mode, e.g. 0600"),
                }),
                &["agent_id", "path", "mode"],
            ),
            4,
            Automatic,
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The validator

/// Checks `target` against `schema` (the JSON Schema subset described in the module docs).
/// Every problem is reported, each with a field path rooted at `target` (`target`,
/// `target.iam_user`, `target.items[2]`), in a deterministic order.
///
/// ```
/// use nexplane_domain::change_type::validate_target;
/// use serde_json::json;
/// let schema = json!({
///     "type": "object",
///     "properties": {"port": {"type": "integer", "minimum": 1, "maximum": 65535}},
///     "required": ["port"],
///     "additionalProperties": false
/// });
/// assert!(validate_target(&schema, &json!({"port": 443})).is_ok());
/// let errs = validate_target(&schema, &json!({"port": "443"})).unwrap_err();
/// assert_eq!(errs[0].field, "target.port");
/// assert_eq!(errs[0].message, "must be an integer");
/// ```
pub fn validate_target(schema: &Value, target: &Value) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    validate_at(schema, target, "target", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn type_matches(ty: &str, v: &Value) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        "integer" => {
            v.is_i64()
                || v.is_u64()
                || v.as_f64()
                    .is_some_and(|f| f.is_finite() && f.fract() == 0.0)
        }
        _ => true,
    }
}

fn type_message(ty: &str) -> String {
    match ty {
        "object" | "array" | "integer" => format!("must be an {ty}"),
        _ => format!("must be a {ty}"),
    }
}

fn join_path(path: &str, key: &str) -> String {
    format!("{path}.{key}")
}

fn validate_at(schema: &Value, v: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(schema) = schema.as_object() else {
        // `true` / `{}`-like schemas accept everything; `false` accepts nothing.
        if schema == &Value::Bool(false) {
            errors.push(FieldError::new(path, "is not allowed"));
        }
        return;
    };

    let type_error = match schema.get("type") {
        Some(Value::String(ty)) => (!type_matches(ty, v)).then(|| type_message(ty)),
        Some(Value::Array(types)) => {
            let names: Vec<&str> = types.iter().filter_map(Value::as_str).collect();
            (!names.is_empty() && !names.iter().any(|t| type_matches(t, v)))
                .then(|| format!("must be one of the types: {}", names.join(", ")))
        }
        _ => None,
    };
    if let Some(message) = type_error {
        errors.push(FieldError::new(path, message));
        return;
    }

    if let Some(Value::Array(options)) = schema.get("enum") {
        if !options.contains(v) {
            let shown: Vec<String> = options
                .iter()
                .map(|o| match o {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            errors.push(FieldError::new(
                path,
                format!("must be one of: {}", shown.join(", ")),
            ));
            return;
        }
    }
    if let Some(c) = schema.get("const") {
        if c != v {
            errors.push(FieldError::new(path, format!("must be {c}")));
            return;
        }
    }

    match v {
        Value::String(s) => check_string(schema, s, path, errors),
        Value::Number(_) => check_number(schema, v, path, errors),
        Value::Object(obj) => check_object(schema, obj, path, errors),
        Value::Array(items) => check_array(schema, items, path, errors),
        _ => {}
    }
}

fn check_string(schema: &Map<String, Value>, s: &str, path: &str, errors: &mut Vec<FieldError>) {
    let len = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
        if len < min {
            let msg = if min == 1 {
                "must not be empty".to_owned()
            } else {
                format!("must be at least {min} characters")
            };
            errors.push(FieldError::new(path, msg));
            return;
        }
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
        if len > max {
            errors.push(FieldError::new(
                path,
                format!("must be at most {max} characters"),
            ));
            return;
        }
    }
    if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
        if let Some(re) = pattern::Pattern::parse(p) {
            if !re.is_match(s) {
                errors.push(FieldError::new(
                    path,
                    format!("does not have the expected format (pattern {p})"),
                ));
            }
        }
    }
}

fn check_number(schema: &Map<String, Value>, v: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(x) = v.as_f64() else { return };
    let bound = |k: &str| {
        schema
            .get(k)
            .and_then(|b| b.as_f64().map(|f| (f, b.to_string())))
    };
    if let Some((min, shown)) = bound("minimum") {
        if x < min {
            errors.push(FieldError::new(path, format!("must be at least {shown}")));
            return;
        }
    }
    if let Some((max, shown)) = bound("maximum") {
        if x > max {
            errors.push(FieldError::new(path, format!("must be at most {shown}")));
        }
    }
}

fn check_object(
    schema: &Map<String, Value>,
    obj: &Map<String, Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let empty = Map::new();
    let props = schema
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    if let Some(Value::Array(required)) = schema.get("required") {
        for name in required.iter().filter_map(Value::as_str) {
            if !obj.contains_key(name) {
                errors.push(FieldError::new(join_path(path, name), "is required"));
            }
        }
    }
    let mut keys: Vec<&String> = obj.keys().collect();
    keys.sort();
    for key in keys {
        let Some(value) = obj.get(key) else { continue };
        let child = join_path(path, key);
        match props.get(key) {
            Some(prop) => validate_at(prop, value, &child, errors),
            None => match schema.get("additionalProperties") {
                Some(Value::Bool(false)) => {
                    errors.push(FieldError::new(child, "is not an allowed field"));
                }
                Some(extra @ Value::Object(_)) => validate_at(extra, value, &child, errors),
                _ => {}
            },
        }
    }
}

fn check_array(
    schema: &Map<String, Value>,
    items: &[Value],
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let n = items.len() as u64;
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
        if n < min {
            errors.push(FieldError::new(
                path,
                format!("must have at least {min} items"),
            ));
        }
    }
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
        if n > max {
            errors.push(FieldError::new(
                path,
                format!("must have at most {max} items"),
            ));
        }
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            validate_at(item_schema, item, &format!("{path}[{i}]"), errors);
        }
    }
}

/// A small regular-expression engine for the `pattern` keyword: enough for identifiers,
/// ARNs and CIDR blocks, with no backtracking blow-up (it tracks sets of positions).
mod pattern {
    /// One parsed element of a pattern.
    #[derive(Debug, Clone)]
    enum Node {
        Char(char),
        Any,
        Class {
            items: Vec<ClassItem>,
            negated: bool,
        },
        Start,
        End,
        Group(Vec<Vec<Node>>),
        Repeat {
            node: Box<Node>,
            min: u32,
            max: Option<u32>,
        },
    }

    #[derive(Debug, Clone)]
    enum ClassItem {
        Range(char, char),
        Digit,
        Word,
        Space,
    }

    impl ClassItem {
        fn matches(&self, c: char) -> bool {
            match self {
                ClassItem::Range(a, b) => (*a..=*b).contains(&c),
                ClassItem::Digit => c.is_ascii_digit(),
                ClassItem::Word => c.is_ascii_alphanumeric() || c == '_',
                ClassItem::Space => c.is_whitespace(),
            }
        }
    }

    /// Repetition counts above this are not supported (keeps matching cheap).
    const MAX_REPEAT: u32 = 10_000;

    /// A parsed pattern.
    #[derive(Debug, Clone)]
    pub(super) struct Pattern {
        alternatives: Vec<Vec<Node>>,
    }

    impl Pattern {
        /// Parses a pattern; `None` when it uses syntax outside the supported subset.
        pub(super) fn parse(src: &str) -> Option<Pattern> {
            let chars: Vec<char> = src.chars().collect();
            let mut p = Parser { chars, pos: 0 };
            let alternatives = p.alternation()?;
            if p.pos != p.chars.len() {
                return None;
            }
            Some(Pattern { alternatives })
        }

        /// Whether the pattern matches somewhere in `text` (JSON Schema semantics: not
        /// anchored unless the pattern says so).
        pub(super) fn is_match(&self, text: &str) -> bool {
            let text: Vec<char> = text.chars().collect();
            let starts = vec![true; text.len() + 1];
            let ends = alternatives(&self.alternatives, &text, &starts);
            ends.iter().any(|&b| b)
        }
    }

    struct Parser {
        chars: Vec<char>,
        pos: usize,
    }

    impl Parser {
        fn peek(&self) -> Option<char> {
            self.chars.get(self.pos).copied()
        }

        fn next(&mut self) -> Option<char> {
            let c = self.peek()?;
            self.pos += 1;
            Some(c)
        }

        fn alternation(&mut self) -> Option<Vec<Vec<Node>>> {
            let mut alts = vec![self.sequence()?];
            while self.peek() == Some('|') {
                self.pos += 1;
                alts.push(self.sequence()?);
            }
            Some(alts)
        }

        fn sequence(&mut self) -> Option<Vec<Node>> {
            let mut seq = Vec::new();
            while let Some(c) = self.peek() {
                if c == '|' || c == ')' {
                    break;
                }
                let atom = self.atom()?;
                let atom = self.quantified(atom)?;
                seq.push(atom);
            }
            Some(seq)
        }

        fn atom(&mut self) -> Option<Node> {
            match self.next()? {
                '^' => Some(Node::Start),
                '$' => Some(Node::End),
                '.' => Some(Node::Any),
                '(' => {
                    if self.peek() == Some('?') {
                        return None; // lookaround and named groups are not supported
                    }
                    let alts = self.alternation()?;
                    (self.next()? == ')').then_some(Node::Group(alts))
                }
                '[' => self.class(),
                '\\' => match self.escape()? {
                    Escaped::Char(c) => Some(Node::Char(c)),
                    Escaped::Class(item) => Some(Node::Class {
                        items: vec![item],
                        negated: false,
                    }),
                },
                '*' | '+' | '?' | '{' | ')' | ']' | '}' => None,
                c => Some(Node::Char(c)),
            }
        }

        fn escape(&mut self) -> Option<Escaped> {
            match self.next()? {
                'd' => Some(Escaped::Class(ClassItem::Digit)),
                'w' => Some(Escaped::Class(ClassItem::Word)),
                's' => Some(Escaped::Class(ClassItem::Space)),
                'n' => Some(Escaped::Char('\n')),
                't' => Some(Escaped::Char('\t')),
                c if c.is_ascii_punctuation() => Some(Escaped::Char(c)),
                _ => None,
            }
        }

        fn class(&mut self) -> Option<Node> {
            let negated = if self.peek() == Some('^') {
                self.pos += 1;
                true
            } else {
                false
            };
            let mut items = Vec::new();
            let mut first = true;
            loop {
                let c = self.next()?;
                if c == ']' && !first {
                    break;
                }
                first = false;
                let lo = match c {
                    '\\' => match self.escape()? {
                        Escaped::Char(c) => c,
                        Escaped::Class(item) => {
                            items.push(item);
                            continue;
                        }
                    },
                    c => c,
                };
                // A range `a-z`, unless the `-` is the last character of the class.
                if self.peek() == Some('-') && self.chars.get(self.pos + 1) != Some(&']') {
                    self.pos += 1;
                    let hi = match self.next()? {
                        '\\' => match self.escape()? {
                            Escaped::Char(c) => c,
                            Escaped::Class(_) => return None,
                        },
                        c => c,
                    };
                    if hi < lo {
                        return None;
                    }
                    items.push(ClassItem::Range(lo, hi));
                } else {
                    items.push(ClassItem::Range(lo, lo));
                }
            }
            Some(Node::Class { items, negated })
        }

        fn number(&mut self) -> Option<u32> {
            let start = self.pos;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
            let digits: String = self.chars[start..self.pos].iter().collect();
            digits.parse().ok().filter(|n| *n <= MAX_REPEAT)
        }

        fn quantified(&mut self, atom: Node) -> Option<Node> {
            let (min, max) = match self.peek() {
                Some('?') => (0, Some(1)),
                Some('*') => (0, None),
                Some('+') => (1, None),
                Some('{') => {
                    self.pos += 1;
                    let min = self.number()?;
                    let max = match self.next()? {
                        '}' => Some(min),
                        ',' => {
                            if self.peek() == Some('}') {
                                self.pos += 1;
                                None
                            } else {
                                let max = self.number()?;
                                if self.next()? != '}' || max < min {
                                    return None;
                                }
                                Some(max)
                            }
                        }
                        _ => return None,
                    };
                    return Some(Node::Repeat {
                        node: Box::new(atom),
                        min,
                        max,
                    });
                }
                _ => return Some(atom),
            };
            self.pos += 1;
            Some(Node::Repeat {
                node: Box::new(atom),
                min,
                max,
            })
        }
    }

    enum Escaped {
        Char(char),
        Class(ClassItem),
    }

    /// Positions reachable after matching any of `alts` from any position in `starts`.
    fn alternatives(alts: &[Vec<Node>], text: &[char], starts: &[bool]) -> Vec<bool> {
        let mut out = vec![false; starts.len()];
        for alt in alts {
            let ends = sequence(alt, text, starts);
            for (o, e) in out.iter_mut().zip(ends) {
                *o |= e;
            }
        }
        out
    }

    fn sequence(nodes: &[Node], text: &[char], starts: &[bool]) -> Vec<bool> {
        let mut cur = starts.to_vec();
        for node in nodes {
            if !cur.iter().any(|&b| b) {
                break;
            }
            cur = step(node, text, &cur);
        }
        cur
    }

    fn step(node: &Node, text: &[char], starts: &[bool]) -> Vec<bool> {
        let n = starts.len();
        let single = |pred: &dyn Fn(char) -> bool| {
            let mut out = vec![false; n];
            for (i, &on) in starts.iter().enumerate() {
                if on && i < text.len() && pred(text[i]) {
                    out[i + 1] = true;
                }
            }
            out
        };
        match node {
            Node::Char(c) => single(&|x| x == *c),
            Node::Any => single(&|x| x != '\n'),
            Node::Class { items, negated } => {
                single(&|x| items.iter().any(|it| it.matches(x)) != *negated)
            }
            Node::Start => {
                let mut out = vec![false; n];
                out[0] = starts[0];
                out
            }
            Node::End => {
                let mut out = vec![false; n];
                out[n - 1] = starts[n - 1];
                out
            }
            Node::Group(alts) => alternatives(alts, text, starts),
            Node::Repeat { node, min, max } => {
                let mut result = vec![false; n];
                if *min == 0 {
                    result.copy_from_slice(starts);
                }
                let mut cur = starts.to_vec();
                let mut count = 0u32;
                loop {
                    if max.is_some_and(|m| count >= m) {
                        break;
                    }
                    cur = step(node, text, &cur);
                    count += 1;
                    if !cur.iter().any(|&b| b) {
                        break;
                    }
                    if count >= *min {
                        let mut grew = false;
                        for (r, c) in result.iter_mut().zip(&cur) {
                            if *c && !*r {
                                *r = true;
                                grew = true;
                            }
                        }
                        // Past the minimum, nothing new can be reached once no new end
                        // position appears (positions are finite).
                        if !grew && max.is_none() {
                            break;
                        }
                    }
                }
                result
            }
        }
    }

    #[cfg(test)]
    #[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    mod tests {
        use super::Pattern;

        fn m(p: &str, s: &str) -> bool {
            Pattern::parse(p)
                .unwrap_or_else(|| panic!("pattern {p} should parse"))
                .is_match(s)
        }

        #[test]
        fn anchors_classes_and_quantifiers() {
            assert!(m("^a+$", "aaa"));
            assert!(!m("^a+$", "aab"));
            assert!(m("b", "abc"), "unanchored patterns search");
            assert!(m("^[a-c]{2,3}$", "abc"));
            assert!(!m("^[a-c]{2,3}$", "a"));
            assert!(!m("^[a-c]{2,3}$", "abca"));
            assert!(m("^[^/]*$", "abc"));
            assert!(!m("^[^/]*$", "a/c"));
            assert!(m(r"^\d{3}-\w+$", "123-ab_c"));
            assert!(m("^x(ab|cd)*y$", "xabcdaby"));
            assert!(!m("^x(ab|cd)*y$", "xabcy"));
            assert!(m("^colou?r$", "color") && m("^colou?r$", "colour"));
            assert!(m("^a{2,}$", "aaaa") && !m("^a{2,}$", "a"));
            assert!(m("^[-a]+$", "-a-") && m("^[a-]+$", "a--"));
            assert!(m(r"^a\.b$", "a.b") && !m(r"^a\.b$", "axb"));
            assert!(m("^$", ""));
            assert!(m("^(a*)*$", "aaaa"), "nested stars terminate");
        }

        #[test]
        fn unsupported_syntax_is_rejected() {
            for p in [
                "(?=a)", "a{2", "[a", "(a", "*a", "a{3,1}", r"\p{L}", "[z-a]",
            ] {
                assert!(Pattern::parse(p).is_none(), "{p}");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn fields(r: Result<(), Vec<FieldError>>) -> Vec<String> {
        r.err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    fn builtin(name: &str) -> &'static ChangeType {
        find_builtin(name).unwrap()
    }

    #[test]
    fn catalog_matches_the_spec_table() {
        let expected: [(&str, ConnectorType, u8, RollbackKind); 13] = [
            (
                "rotate_iam_access_key",
                ConnectorType::Aws,
                5,
                RollbackKind::Automatic,
            ),
            (
                "deactivate_iam_access_key",
                ConnectorType::Aws,
                4,
                RollbackKind::Automatic,
            ),
            (
                "delete_iam_access_key",
                ConnectorType::Aws,
                6,
                RollbackKind::None,
            ),
            (
                "lock_iam_user",
                ConnectorType::Aws,
                6,
                RollbackKind::Automatic,
            ),
            (
                "unlock_iam_user",
                ConnectorType::Aws,
                4,
                RollbackKind::Automatic,
            ),
            (
                "attach_iam_user_policy",
                ConnectorType::Aws,
                5,
                RollbackKind::Automatic,
            ),
            (
                "detach_iam_user_policy",
                ConnectorType::Aws,
                5,
                RollbackKind::Automatic,
            ),
            (
                "stop_ec2_instance",
                ConnectorType::Aws,
                7,
                RollbackKind::Automatic,
            ),
            (
                "start_ec2_instance",
                ConnectorType::Aws,
                2,
                RollbackKind::Automatic,
            ),
            (
                "revoke_security_group_ingress",
                ConnectorType::Aws,
                6,
                RollbackKind::Automatic,
            ),
            (
                "authorize_security_group_ingress",
                ConnectorType::Aws,
                7,
                RollbackKind::Automatic,
            ),
            (
                "agent_write_file",
                ConnectorType::Agent,
                5,
                RollbackKind::Automatic,
            ),
            (
                "agent_set_file_mode",
                ConnectorType::Agent,
                4,
                RollbackKind::Automatic,
            ),
        ];
        let cat = builtin_catalog();
        assert_eq!(cat.len(), expected.len());
        for (ct, (name, conn, risk, rb)) in cat.iter().zip(expected) {
            assert_eq!(ct.name, name);
            assert_eq!(ct.connector_type, conn, "{name}");
            assert_eq!(ct.base_risk, risk, "{name}");
            assert_eq!(ct.rollback, rb, "{name}");
            assert!(!ct.description.is_empty());
            assert_eq!(ct.target_schema["type"], "object");
            assert_eq!(ct.target_schema["additionalProperties"], false);
            // Every required field is a declared property.
            let props = ct.target_schema["properties"].as_object().unwrap();
            for r in ct.target_schema["required"].as_array().unwrap() {
                assert!(props.contains_key(r.as_str().unwrap()), "{name}: {r}");
            }
        }
        assert!(find_builtin("format_disk").is_none());
    }

    #[test]
    fn every_builtin_pattern_is_supported() {
        fn walk(v: &Value, name: &str) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(p)) = m.get("pattern") {
                        assert!(pattern::Pattern::parse(p).is_some(), "{name}: {p}");
                    }
                    m.values().for_each(|c| walk(c, name));
                }
                Value::Array(a) => a.iter().for_each(|c| walk(c, name)),
                _ => {}
            }
        }
        for ct in builtin_catalog() {
            walk(&ct.target_schema, &ct.name);
        }
    }

    #[test]
    fn serializes_as_the_api_lists_it() {
        let v = serde_json::to_value(builtin("delete_iam_access_key")).unwrap();
        assert_eq!(v["connector_type"], "aws");
        assert_eq!(v["rollback"], "none");
        assert_eq!(v["base_risk"], 6);
        let v = serde_json::to_value(builtin("agent_write_file")).unwrap();
        assert_eq!(v["connector_type"], "agent");
        assert_eq!(v["rollback"], "automatic");
    }

    #[test]
    fn iam_targets() {
        let rotate = builtin("rotate_iam_access_key");
        assert!(rotate
            .validate_target(&json!({"iam_user": "prod-deploy"}))
            .is_ok());
        assert!(rotate
            .validate_target(
                &json!({"iam_user": "ci+bot@x", "access_key_id": "AKIAIOSFODNN7EXAMPLE"})
            )
            .is_ok());
        assert_eq!(
            fields(rotate.validate_target(&json!({}))),
            ["target.iam_user"]
        );
        assert_eq!(
            fields(rotate.validate_target(&json!({"iam_user": "a", "targte": 1}))),
            ["target.targte"]
        );
        assert_eq!(
            fields(rotate.validate_target(&json!({"iam_user": "bad user"}))),
            ["target.iam_user"]
        );
        assert_eq!(
            fields(rotate.validate_target(&json!({"iam_user": ""}))),
            ["target.iam_user"]
        );
        assert_eq!(
            fields(rotate.validate_target(&json!({"iam_user": "x".repeat(65)}))),
            ["target.iam_user"]
        );
        assert_eq!(
            fields(rotate.validate_target(&json!({"iam_user": 7, "access_key_id": "akia"}))),
            ["target.access_key_id", "target.iam_user"]
        );
        assert_eq!(
            fields(rotate.validate_target(&json!("prod-deploy"))),
            ["target"]
        );

        let deactivate = builtin("deactivate_iam_access_key");
        assert_eq!(
            fields(deactivate.validate_target(&json!({"iam_user": "u"}))),
            ["target.access_key_id"]
        );

        let attach = builtin("attach_iam_user_policy");
        for arn in [
            "arn:aws:iam::aws:policy/ReadOnlyAccess",
            "arn:aws:iam::123456789012:policy/team/Deploy",
            "arn:aws-us-gov:iam::aws:policy/AdministratorAccess",
        ] {
            assert!(
                attach
                    .validate_target(&json!({"iam_user": "u", "policy_arn": arn}))
                    .is_ok(),
                "{arn}"
            );
        }
        for arn in [
            "ReadOnlyAccess",
            "arn:aws:iam::12345:policy/X",
            "arn:aws:s3:::bucket",
        ] {
            assert_eq!(
                fields(attach.validate_target(&json!({"iam_user": "u", "policy_arn": arn}))),
                ["target.policy_arn"],
                "{arn}"
            );
        }
    }

    #[test]
    fn ec2_and_security_group_targets() {
        let stop = builtin("stop_ec2_instance");
        assert!(stop
            .validate_target(&json!({"instance_id": "i-0123456789abcdef0"}))
            .is_ok());
        assert!(stop
            .validate_target(&json!({"instance_id": "i-01234567", "region": "eu-west-1"}))
            .is_ok());
        assert_eq!(
            fields(stop.validate_target(&json!({"instance_id": "i-xyz", "region": "moon"}))),
            ["target.instance_id", "target.region"]
        );

        let auth = builtin("authorize_security_group_ingress");
        let rule = json!({
            "group_id": "sg-0123456789abcdef0", "protocol": "tcp",
            "from_port": 443, "to_port": 443, "cidr": "203.0.113.0/24"
        });
        assert!(auth.validate_target(&rule).is_ok());
        let with = |k: &str, v: Value| {
            let mut r = rule.clone();
            r[k] = v;
            r
        };
        assert_eq!(
            fields(auth.validate_target(&with("protocol", json!("sctp")))),
            ["target.protocol"]
        );
        assert_eq!(
            fields(auth.validate_target(&with("from_port", json!(70000)))),
            ["target.from_port"]
        );
        assert_eq!(
            fields(auth.validate_target(&with("from_port", json!(22.5)))),
            ["target.from_port"]
        );
        assert!(auth
            .validate_target(&with("from_port", json!(443.0)))
            .is_ok());
        assert_eq!(
            fields(auth.validate_target(&with("to_port", json!(80)))),
            ["target.to_port"]
        );
        assert_eq!(
            fields(auth.validate_target(&with("from_port", json!(-1)))),
            ["target.from_port"]
        );
        for bad in [
            "10.0.0.0",
            "256.0.0.0/8",
            "10.0.0.0/33",
            "10.0.0/8",
            " 10.0.0.0/8",
        ] {
            assert_eq!(
                fields(auth.validate_target(&with("cidr", json!(bad)))),
                ["target.cidr"],
                "{bad}"
            );
        }
        for good in ["0.0.0.0/0", "10.0.0.0/8", "192.168.255.255/32"] {
            assert!(
                auth.validate_target(&with("cidr", json!(good))).is_ok(),
                "{good}"
            );
        }
        let icmp = json!({
            "group_id": "sg-01234567", "protocol": "icmp",
            "from_port": -1, "to_port": -1, "cidr": "0.0.0.0/0"
        });
        assert!(auth.validate_target(&icmp).is_ok());
        let mut missing = rule.clone();
        missing.as_object_mut().unwrap().remove("cidr");
        assert_eq!(fields(auth.validate_target(&missing)), ["target.cidr"]);
    }

    #[test]
    fn agent_targets() {
        let agent = "agt_01jef8z7q3m4n5p6r7s8t9v0wx";
        let write = builtin("agent_write_file");
        assert!(write
            .validate_target(
                &json!({"agent_id": agent, "path": "/etc/app/app.conf", "content": ""})
            )
            .is_ok());
        assert!(write
            .validate_target(
                &json!({"agent_id": agent, "path": "/etc/x", "content": "a", "mode": "0644"})
            )
            .is_ok());
        assert_eq!(
            fields(write.validate_target(&json!({"agent_id": "usr_01jef8z7q3m4n5p6r7s8t9v0wx", "path": "etc/x", "content": "a", "mode": "999"}))),
            ["target.agent_id", "target.mode", "target.path"]
        );
        assert_eq!(
            fields(write.validate_target(
                &json!({"agent_id": agent, "path": "/etc/../root/x", "content": "a"})
            )),
            ["target.path"]
        );
        let too_big = "x".repeat(AGENT_FILE_CONTENT_MAX_CHARS as usize + 1);
        assert_eq!(
            fields(write.validate_target(
                &json!({"agent_id": agent, "path": "/etc/x", "content": too_big})
            )),
            ["target.content"]
        );
        let chmod = builtin("agent_set_file_mode");
        assert_eq!(
            fields(chmod.validate_target(&json!({"agent_id": agent, "path": "/etc/x"}))),
            ["target.mode"]
        );
        assert!(chmod
            .validate_target(&json!({"agent_id": agent, "path": "/etc/x", "mode": "600"}))
            .is_ok());
    }

    #[test]
    fn generic_validator_keywords() {
        let schema = json!({
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
                "flag": {"type": "boolean"},
                "kind": {"const": "x"},
                "n": {"type": ["integer", "null"]},
            },
            "additionalProperties": {"type": "string"}
        });
        assert!(validate_target(
            &schema,
            &json!({"tags": ["a"], "flag": true, "kind": "x", "n": null, "extra": "s"})
        )
        .is_ok());
        let errs = validate_target(
            &schema,
            &json!({"tags": ["abcd", 1, "a"], "flag": "yes", "kind": "y", "n": "1", "extra": 1}),
        )
        .unwrap_err();
        let got: Vec<(&str, &str)> = errs
            .iter()
            .map(|e| (e.field.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("target.extra", "must be a string"),
                ("target.flag", "must be a boolean"),
                ("target.kind", "must be \"x\""),
                ("target.n", "must be one of the types: integer, null"),
                ("target.tags", "must have at most 2 items"),
                ("target.tags[0]", "must be at most 3 characters"),
                ("target.tags[1]", "must be a string"),
            ]
        );
    }
}
