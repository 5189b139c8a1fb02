//! The operations of the Meraki Dashboard API, and which one a request is.
//!
//! `endpoints/meraki-api-v1.tsv` lists every operation of the API as the official `meraki`
//! Python SDK defines it: HTTP method, path template below `/api/v1` (parameters written
//! `{name}`, spelled as the SDK spells them), operationId and tags (the first tag is the product
//! family: `organizations`, `wireless`, `switch`, ...). It is compiled into the binary, and its
//! first line names the SDK release it was generated from.
//!
//! The table is generated, never edited by hand. To regenerate it for another SDK release:
//!
//! ```text
//! python -m pip install meraki==X.Y.Z
//! python scripts/gen-endpoint-table.py --output src/endpoints/meraki-api-v1.tsv
//! ```
//!
//! then run this module's tests (`--check FILE` makes the script only compare).
//!
//! [`EndpointTable::find`] matches already percent-decoded path segments against a trie built
//! once at parse time, so a lookup costs about one map probe per segment and allocates nothing.
//! Literal segments match case-sensitively, as the Dashboard API's own routes are spelled: a
//! mis-cased literal finds no operation, so a caller must read `None` as "not a known operation",
//! never as "allowed". Where a literal and a parameter could both match a segment, the literal
//! wins (`/networks/{networkId}/clients/overview` is not `/networks/{networkId}/clients/{clientId}`
//! with `clientId = "overview"`), unless only the parameter's branch has the request's method.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::OnceLock;

use http::Method;

/// The built-in table, generated from the SDK release named on its first line.
const BUILTIN: &str = include_str!("endpoints/meraki-api-v1.tsv");

/// The first line's fixed start; the SDK version and the operation count follow it.
const VERSION_PREFIX: &str = "# meraki-sdk ";

/// The second line.
const HEADER: &str = "method\tpath\toperation\ttags\tscope";

/// One operation of the Dashboard API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The HTTP method.
    pub method: Method,
    /// The path template below `/api/v1`, e.g. `/organizations/{organizationId}/networks`.
    pub template: String,
    /// The operationId, e.g. `getOrganizationNetworks`.
    pub operation_id: String,
    /// The tags: product family first, then usually `configure`, `monitor` or `liveTools`.
    pub tags: Vec<String>,
    /// The OAuth scope Meraki's API index says the operation requires (`None`: none listed).
    pub scope: Option<crate::scope::Scope>,
    /// Each parameter's name and the index of the segment it stands for.
    params: Vec<(String, usize)>,
}

impl Operation {
    /// The product family: the first tag (`organizations`, `wireless`, `switch`, ...).
    pub fn family(&self) -> &str {
        self.tags.first().map_or("", String::as_str)
    }

    /// Whether the operation only reads (GET or HEAD).
    pub fn is_read(&self) -> bool {
        self.method == Method::GET || self.method == Method::HEAD
    }

    /// The names of the template's parameters, in path order.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|(name, _)| name.as_str())
    }
}

/// An operation found for a request, with the values its path gives the parameters.
#[derive(Debug, Clone, Copy)]
pub struct Match<'t, 's> {
    operation: &'t Operation,
    segments: &'s [&'s str],
}

impl<'t, 's> Match<'t, 's> {
    /// The operation.
    pub fn operation(&self) -> &'t Operation {
        self.operation
    }

    /// `(name, value)` of each parameter, in path order.
    pub fn params(&self) -> impl Iterator<Item = (&'t str, &'s str)> {
        let segments = self.segments;
        // A match has exactly as many segments as its template, so every index is in range.
        self.operation
            .params
            .iter()
            .map(move |(name, index)| (name.as_str(), segments[*index]))
    }

    /// The value of the parameter `name`, if the template has it.
    pub fn param(&self, name: &str) -> Option<&'s str> {
        self.params()
            .find(|(n, _)| *n == name)
            .map(|(_, value)| value)
    }
}

/// A table parse failure, with the 1-based line it is on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("endpoint table line {line}: {kind}")]
pub struct TableError {
    /// The line, counted from 1.
    pub line: usize,
    /// What is wrong with it.
    pub kind: TableErrorKind,
}

/// What is wrong with a line of the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableErrorKind {
    /// The first line is not `# meraki-sdk <version> <count> operations ...`.
    #[error("expected `# meraki-sdk <version> <count> operations ...`")]
    BadVersionLine,
    /// The second line is not the column header.
    #[error("expected the header `method<TAB>path<TAB>operation<TAB>tags<TAB>scope`")]
    BadHeader,
    /// A row without exactly five tab-separated fields.
    #[error("expected 5 tab-separated fields, found {0}")]
    FieldCount(usize),
    /// A scope that is not one of Meraki's.
    #[error("unknown OAuth scope {0:?}")]
    BadScope(String),
    /// A method that is not an HTTP method token.
    #[error("invalid method {0:?}")]
    BadMethod(String),
    /// A path template that is not `/segment/{param}/...`.
    #[error("invalid path template {template:?}: {reason}")]
    BadTemplate {
        template: String,
        reason: &'static str,
    },
    /// An empty operationId.
    #[error("empty operationId")]
    EmptyOperationId,
    /// No tags, or an empty one.
    #[error("empty tag in {0:?}")]
    EmptyTag(String),
    /// A route that matches the same requests as an earlier row.
    #[error("{method} {template} matches the same requests as line {first}")]
    DuplicateRoute {
        method: Method,
        template: String,
        first: usize,
    },
    /// An operationId already used by an earlier row.
    #[error("operationId {operation_id} is already on line {first}")]
    DuplicateOperation { operation_id: String, first: usize },
    /// The first line's count disagrees with the rows.
    #[error("the first line declares {declared} operations but the table has {found}")]
    CountMismatch { declared: usize, found: usize },
}

impl TableErrorKind {
    fn at(self, line: usize) -> TableError {
        TableError { line, kind: self }
    }
}

/// A trie node: the segments matched so far lead here.
#[derive(Debug, Default)]
struct Node {
    /// Children for literal segments. Measured faster than a SipHash `HashMap`: segments are
    /// short, and few nodes have more than a few dozen children.
    literals: BTreeMap<String, Node>,
    /// The child for a `{param}` segment, whatever its name.
    param: Option<Box<Node>>,
    /// Operations whose template ends here: method and index into `operations`.
    ends: Vec<(Method, usize)>,
}

impl Node {
    /// The operation for `method` at the end of `segments`, literals first.
    fn find(&self, method: &Method, segments: &[&str]) -> Option<usize> {
        let Some((first, rest)) = segments.split_first() else {
            return self
                .ends
                .iter()
                .find(|(m, _)| m == method)
                .map(|&(_, index)| index);
        };
        // Falling back to the parameter when the literal's branch has no operation for this
        // method backtracks, but only at the few nodes having both, and the trie is shallow.
        if let Some(index) = self
            .literals
            .get(*first)
            .and_then(|child| child.find(method, rest))
        {
            return Some(index);
        }
        if first.is_empty() {
            return None;
        }
        self.param.as_deref()?.find(method, rest)
    }
}

/// The Dashboard API's operations, indexed for matching request paths.
pub struct EndpointTable {
    sdk_version: String,
    operations: Vec<Operation>,
    by_operation_id: HashMap<String, usize>,
    root: Node,
}

// By hand: the derived form would print a thousand operations and their trie into a log line.
impl fmt::Debug for EndpointTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointTable")
            .field("sdk_version", &self.sdk_version)
            .field("operations", &self.operations.len())
            .finish_non_exhaustive()
    }
}

impl EndpointTable {
    /// The table compiled into the binary, parsed on first use.
    pub fn builtin() -> &'static EndpointTable {
        static TABLE: OnceLock<EndpointTable> = OnceLock::new();
        TABLE.get_or_init(|| {
            EndpointTable::parse(BUILTIN)
                .expect("src/endpoints/meraki-api-v1.tsv is generated and checked by the tests")
        })
    }

    /// Parses a table in the format of `endpoints/meraki-api-v1.tsv`.
    pub fn parse(text: &str) -> Result<Self, TableError> {
        let mut lines = text.lines().zip(1..);
        let (sdk_version, declared) = lines
            .next()
            .and_then(|(line, _)| version_line(line))
            .ok_or_else(|| TableErrorKind::BadVersionLine.at(1))?;
        if lines.next().map(|(line, _)| line) != Some(HEADER) {
            return Err(TableErrorKind::BadHeader.at(2));
        }

        let mut table = EndpointTable {
            sdk_version: sdk_version.to_owned(),
            operations: Vec::new(),
            by_operation_id: HashMap::new(),
            root: Node::default(),
        };
        // The line of each operation, for naming the first of two clashing rows.
        let mut line_of = Vec::new();
        for (line, number) in lines {
            if line.is_empty() {
                continue;
            }
            let operation = row(line).map_err(|kind| kind.at(number))?;
            let index = table.operations.len();

            if let Some(&first) = table.by_operation_id.get(&operation.operation_id) {
                return Err(TableErrorKind::DuplicateOperation {
                    operation_id: operation.operation_id,
                    first: line_of[first],
                }
                .at(number));
            }
            let mut node = &mut table.root;
            for segment in operation.template.split('/').skip(1) {
                node = if segment.starts_with('{') {
                    node.param.get_or_insert_with(Box::default)
                } else {
                    node.literals.entry(segment.to_owned()).or_default()
                };
            }
            if let Some(&(_, first)) = node.ends.iter().find(|(m, _)| *m == operation.method) {
                return Err(TableErrorKind::DuplicateRoute {
                    method: operation.method,
                    template: operation.template,
                    first: line_of[first],
                }
                .at(number));
            }
            node.ends.push((operation.method.clone(), index));
            table
                .by_operation_id
                .insert(operation.operation_id.clone(), index);
            table.operations.push(operation);
            line_of.push(number);
        }

        if declared != table.operations.len() {
            return Err(TableErrorKind::CountMismatch {
                declared,
                found: table.operations.len(),
            }
            .at(1));
        }
        Ok(table)
    }

    /// The version of the `meraki` SDK the table was generated from.
    pub fn sdk_version(&self) -> &str {
        &self.sdk_version
    }

    /// The number of operations.
    pub fn len(&self) -> usize {
        self.operations.len()
    }

    /// Whether the table has no operations.
    pub fn is_empty(&self) -> bool {
        self.operations.is_empty()
    }

    /// The operation a request is, from its percent-decoded path segments below `/api/v1`.
    ///
    /// `segments` of `GET /api/v1/organizations/123/networks` are
    /// `["organizations", "123", "networks"]`. HEAD matches as GET. A parameter matches any
    /// non-empty segment.
    pub fn find<'s>(&self, method: &Method, segments: &'s [&'s str]) -> Option<Match<'_, 's>> {
        // Meraki answers HEAD wherever it answers GET; the table lists GET only.
        let method = if *method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        let index = self.root.find(method, segments)?;
        Some(Match {
            operation: &self.operations[index],
            segments,
        })
    }

    /// Every operation, sorted by path template then method.
    pub fn operations(&self) -> impl Iterator<Item = &Operation> {
        self.operations.iter()
    }

    /// The operation with this operationId.
    pub fn by_operation_id(&self, id: &str) -> Option<&Operation> {
        self.by_operation_id
            .get(id)
            .map(|&index| &self.operations[index])
    }

    /// The distinct product families (first tags), sorted.
    pub fn families(&self) -> Vec<&str> {
        let families: BTreeSet<&str> = self.operations.iter().map(Operation::family).collect();
        families.into_iter().collect()
    }
}

/// The SDK version and operation count of the first line.
/// The name the proxy gives the operation `method path` is (`path` below `/api/v1`, already
/// normalized, a query allowed): Meraki's operationId when the table has it, else the method
/// and the path with its id-like segments as `{}` (a path template). The refresh engine
/// remembers refusals under it.
pub fn operation_key(method: &Method, path: &str) -> std::borrow::Cow<'static, str> {
    let path = path.split('?').next().unwrap_or_default();
    let mut buf = [""; 16];
    let mut n = 0;
    for seg in path.split('/').skip(1) {
        if n == buf.len() {
            return template_of(method, path).into();
        }
        buf[n] = seg;
        n += 1;
    }
    match EndpointTable::builtin().find(method, &buf[..n]) {
        Some(m) => m.operation().operation_id.as_str().into(),
        None => template_of(method, path).into(),
    }
}

/// `method path` with the segments that look like ids (digits, and either only digits or some
/// punctuation: `123`, `L_123`, `Q2XX-AAAA-0001`) as `{}`; collection names such as
/// `l3FirewallRules` stay.
pub fn template_of(method: &Method, path: &str) -> String {
    let path = path.split('?').next().unwrap_or_default();
    let mut out = String::with_capacity(path.len() + 8);
    out.push_str(method.as_str());
    out.push(' ');
    for seg in path.split('/').skip(1) {
        out.push('/');
        let digits = seg.bytes().any(|b| b.is_ascii_digit());
        let id = digits
            && (seg.bytes().all(|b| b.is_ascii_digit())
                || seg.bytes().any(|b| !b.is_ascii_alphanumeric()));
        out.push_str(if id { "{}" } else { seg });
    }
    out
}

fn version_line(line: &str) -> Option<(&str, usize)> {
    let mut words = line.strip_prefix(VERSION_PREFIX)?.split_whitespace();
    let version = words.next()?;
    let count = words.next()?.parse().ok()?;
    (words.next()? == "operations").then_some((version, count))
}

/// One row: `method<TAB>template<TAB>operationId<TAB>tag,tag,...<TAB>scope` (scope empty when
/// Meraki's index lists none).
fn row(line: &str) -> Result<Operation, TableErrorKind> {
    let fields: Vec<&str> = line.split('\t').collect();
    let &[method, template, operation_id, tags, scope] = fields.as_slice() else {
        return Err(TableErrorKind::FieldCount(fields.len()));
    };
    let scope = match scope {
        "" => None,
        s => Some(
            crate::scope::Scope::parse(s).ok_or_else(|| TableErrorKind::BadScope(s.to_owned()))?,
        ),
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| TableErrorKind::BadMethod(method.to_owned()))?;
    let params = template_params(template).map_err(|reason| TableErrorKind::BadTemplate {
        template: template.to_owned(),
        reason,
    })?;
    if operation_id.is_empty() {
        return Err(TableErrorKind::EmptyOperationId);
    }
    let tags: Vec<String> = tags.split(',').map(str::to_owned).collect();
    if tags.iter().any(String::is_empty) {
        return Err(TableErrorKind::EmptyTag(line.to_owned()));
    }
    Ok(Operation {
        method,
        template: template.to_owned(),
        operation_id: operation_id.to_owned(),
        tags,
        scope,
        params,
    })
}

/// The parameters of a template, checking that it is `/literal/{param}/...`.
fn template_params(template: &str) -> Result<Vec<(String, usize)>, &'static str> {
    let rest = template
        .strip_prefix('/')
        .ok_or("does not start with '/'")?;
    let mut params = Vec::new();
    for (index, segment) in rest.split('/').enumerate() {
        if segment.is_empty() {
            return Err("empty segment");
        }
        match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) if !name.is_empty() && !name.contains(['{', '}']) => {
                params.push((name.to_owned(), index));
            }
            Some(_) => return Err("invalid parameter name"),
            None if segment.contains(['{', '}']) => {
                return Err("a segment mixes text and a parameter")
            }
            None => {}
        }
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finds `path` (below `/api/v1`) in `table`: operationId and bound parameters.
    fn find_in(
        table: &EndpointTable,
        method: Method,
        path: &str,
    ) -> Option<(String, Vec<(String, String)>)> {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let found = table.find(&method, &segments)?;
        let params = found
            .params()
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        Some((found.operation().operation_id.clone(), params))
    }

    fn find(method: Method, path: &str) -> Option<(String, Vec<(String, String)>)> {
        find_in(EndpointTable::builtin(), method, path)
    }

    #[test]
    fn operations_are_named_by_operation_id_else_by_template() {
        assert_eq!(
            operation_key(&Method::GET, "/networks/L_123?perPage=3"),
            "getNetwork"
        );
        assert_eq!(
            operation_key(&Method::HEAD, "/devices/Q2XX-AAAA-0001"),
            "getDevice"
        );
        assert_eq!(
            operation_key(&Method::GET, "/networks/L_1/appliance/l3FirewallRules/x"),
            "GET /networks/{}/appliance/l3FirewallRules/x"
        );
        assert_eq!(
            template_of(&Method::PUT, "/organizations/123/things/N_9/Q2XX-1-2?a=1"),
            "PUT /organizations/{}/things/{}/{}"
        );
    }

    fn id_of(method: Method, path: &str) -> Option<String> {
        find(method, path).map(|(id, _)| id)
    }

    fn bound(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|&(n, v)| (n.to_owned(), v.to_owned()))
            .collect()
    }

    fn table(rows: &[&str]) -> Result<EndpointTable, TableError> {
        let mut text = format!("# meraki-sdk 0.0.1 {} operations\n{HEADER}\n", rows.len());
        for row in rows {
            text.push_str(row);
            text.push('\n');
        }
        EndpointTable::parse(&text)
    }

    #[test]
    fn builtin_table_parses() {
        let table = EndpointTable::builtin();
        assert!(table.len() > 500, "only {} operations", table.len());
        assert!(!table.is_empty());
        assert_eq!(
            format!("{table:?}"),
            format!(
                "EndpointTable {{ sdk_version: \"4.7.0\", operations: {}, .. }}",
                table.len()
            )
        );
        assert_eq!(table.sdk_version(), "4.7.0");
        assert_eq!(table.operations().count(), table.len());
        for family in ["organizations", "networks", "devices", "wireless", "switch"] {
            assert!(table.families().contains(&family), "no family {family}");
        }
        for family in ["appliance", "camera", "sensor", "sm", "cellularGateway"] {
            assert!(table.families().contains(&family), "no family {family}");
        }
    }

    #[test]
    fn every_builtin_operation_finds_itself() {
        let table = EndpointTable::builtin();
        for op in table.operations() {
            let path = op.template.replace(['{', '}'], "");
            let (id, params) = find_in(table, op.method.clone(), &path).unwrap();
            assert_eq!(id, op.operation_id, "{} {}", op.method, op.template);
            let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, op.params().collect::<Vec<_>>());
        }
    }

    #[test]
    fn known_operations_resolve() {
        assert_eq!(
            find(Method::GET, "organizations/123/networks"),
            Some((
                "getOrganizationNetworks".to_owned(),
                bound(&[("organizationId", "123")])
            ))
        );
        assert_eq!(
            find(Method::PUT, "networks/N_1"),
            Some(("updateNetwork".to_owned(), bound(&[("networkId", "N_1")])))
        );
        assert_eq!(
            id_of(Method::POST, "organizations/123/actionBatches").as_deref(),
            Some("createOrganizationActionBatch")
        );
        assert_eq!(
            find(Method::GET, "devices/Q2XX-AAAA-BBBB"),
            Some((
                "getDevice".to_owned(),
                bound(&[("serial", "Q2XX-AAAA-BBBB")])
            ))
        );
        assert_eq!(
            find(Method::GET, "networks/N_1/clients/k74272e"),
            Some((
                "getNetworkClient".to_owned(),
                bound(&[("networkId", "N_1"), ("clientId", "k74272e")])
            ))
        );
    }

    #[test]
    fn head_matches_as_get() {
        assert_eq!(
            id_of(Method::HEAD, "organizations/123/networks").as_deref(),
            Some("getOrganizationNetworks")
        );
        // A route that has no GET has no HEAD either.
        assert_eq!(
            id_of(Method::HEAD, "organizations/123/networks/combine"),
            None
        );
        assert_eq!(
            id_of(Method::POST, "organizations/123/networks/combine").as_deref(),
            Some("combineOrganizationNetworks")
        );
    }

    #[test]
    fn unknown_paths_and_methods_find_nothing() {
        assert_eq!(id_of(Method::GET, ""), None);
        assert_eq!(id_of(Method::GET, "organizations/123/nonsense"), None);
        assert_eq!(
            id_of(Method::GET, "organizations/123/networks/extra/deep"),
            None
        );
        assert_eq!(id_of(Method::GET, "nowhere"), None);
        assert_eq!(id_of(Method::DELETE, "organizations/123/networks"), None);
        assert_eq!(id_of(Method::PATCH, "networks/N_1"), None);
        assert_eq!(id_of(Method::OPTIONS, "organizations"), None);
        // Literals are case-sensitive, as Meraki's routes are.
        assert_eq!(id_of(Method::GET, "Organizations/123/networks"), None);
        // A parameter never matches an empty segment.
        assert_eq!(table_with_empty_segment(), None);
    }

    fn table_with_empty_segment() -> Option<String> {
        let table = EndpointTable::builtin();
        let found = table.find(&Method::GET, &["networks", ""])?;
        Some(found.operation().operation_id.clone())
    }

    #[test]
    fn literal_beats_parameter() {
        assert_eq!(
            id_of(Method::GET, "networks/N_1/clients/overview").as_deref(),
            Some("getNetworkClientsOverview")
        );
        // `provision` is a literal for POST only, so a GET takes the parameter's branch.
        assert_eq!(
            find(Method::GET, "networks/N_1/clients/provision"),
            Some((
                "getNetworkClient".to_owned(),
                bound(&[("networkId", "N_1"), ("clientId", "provision")])
            ))
        );

        // Whatever the order of the rows.
        let table = table(&[
            "GET\t/organizations/{organizationId}/{x}\tgetX\torganizations\t",
            "GET\t/organizations/{organizationId}/networks\tgetNetworks\torganizations\t",
        ])
        .unwrap();
        assert_eq!(
            find_in(&table, Method::GET, "organizations/1/networks"),
            Some(("getNetworks".to_owned(), bound(&[("organizationId", "1")])))
        );
        assert_eq!(
            find_in(&table, Method::GET, "organizations/1/devices"),
            Some((
                "getX".to_owned(),
                bound(&[("organizationId", "1"), ("x", "devices")])
            ))
        );
    }

    #[test]
    fn match_and_operation_accessors() {
        let table = EndpointTable::builtin();
        let segments = ["networks", "N_1", "clients", "k74272e"];
        let found = table.find(&Method::GET, &segments).unwrap();
        assert_eq!(found.param("clientId"), Some("k74272e"));
        assert_eq!(found.param("serial"), None);
        let op = found.operation();
        assert_eq!(op.family(), "networks");
        assert!(op.is_read());
        assert_eq!(op.params().collect::<Vec<_>>(), ["networkId", "clientId"]);

        let op = table.by_operation_id("updateNetwork").unwrap();
        assert_eq!(op.method, Method::PUT);
        assert_eq!(op.template, "/networks/{networkId}");
        assert_eq!(op.tags, ["networks", "configure"]);
        assert!(!op.is_read());
        assert!(table.by_operation_id("noSuchOperation").is_none());
        assert_eq!(
            table
                .by_operation_id("getNetworkWirelessSsids")
                .unwrap()
                .family(),
            "wireless"
        );
    }

    #[test]
    fn parse_errors_name_their_line() {
        let err = table(&["GET\t/a\tgetA\ta\t", "FO O\t/b\tgetB\tb\t"]).unwrap_err();
        assert_eq!(err.line, 4);
        assert_eq!(err.kind, TableErrorKind::BadMethod("FO O".to_owned()));
        assert!(
            err.to_string().starts_with("endpoint table line 4: "),
            "{err}"
        );

        let err = table(&["GET\t/a\tgetA"]).unwrap_err();
        assert_eq!(err, TableErrorKind::FieldCount(3).at(3));

        for template in ["a", "/a/", "/a//b", "/a/{}", "/a/x{y}", "/a/{y"] {
            let err = table(&[&format!("GET\t{template}\tgetA\ta\t")]).unwrap_err();
            assert_eq!(err.line, 3, "{template}");
            assert!(
                matches!(err.kind, TableErrorKind::BadTemplate { .. }),
                "{template}: {err}"
            );
        }
        assert_eq!(
            table(&["GET\t/a\t\ta\t"]).unwrap_err().kind,
            TableErrorKind::EmptyOperationId
        );
        assert!(matches!(
            table(&["GET\t/a\tgetA\ta,,b\t"]).unwrap_err().kind,
            TableErrorKind::EmptyTag(_)
        ));

        let err = table(&["GET\t/a/{x}\tgetA\ta\t", "GET\t/a/{y}\tgetB\ta\t"]).unwrap_err();
        assert_eq!(err.line, 4);
        assert!(matches!(
            err.kind,
            TableErrorKind::DuplicateRoute { first: 3, .. }
        ));
        let err = table(&["GET\t/a\tgetA\ta\t", "PUT\t/a\tgetA\ta\t"]).unwrap_err();
        assert_eq!(
            err,
            TableErrorKind::DuplicateOperation {
                operation_id: "getA".to_owned(),
                first: 3
            }
            .at(4)
        );
    }

    #[test]
    fn header_lines_are_checked() {
        assert_eq!(
            EndpointTable::parse("").unwrap_err(),
            TableErrorKind::BadVersionLine.at(1)
        );
        assert_eq!(
            EndpointTable::parse("# meraki-sdk 1.0 x operations\n").unwrap_err(),
            TableErrorKind::BadVersionLine.at(1)
        );
        assert_eq!(
            EndpointTable::parse("# meraki-sdk 1.0 0 operations\nmethod\tpath\n").unwrap_err(),
            TableErrorKind::BadHeader.at(2)
        );
        let text = format!("# meraki-sdk 1.0 2 operations\n{HEADER}\nGET\t/a\tgetA\ta\t\n");
        assert_eq!(
            EndpointTable::parse(&text).unwrap_err(),
            TableErrorKind::CountMismatch {
                declared: 2,
                found: 1
            }
            .at(1)
        );
        let empty = EndpointTable::parse(&format!("# meraki-sdk 1.0 0 operations\n{HEADER}\n"));
        assert!(empty.unwrap().is_empty());
    }
}
