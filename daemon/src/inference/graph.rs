//! The per-cell model graph: which per-cell table columns each `cell-table` model reads, who
//! produces them, and the order the per-cell models run in on a field. Checked once at load, so
//! a missing producer, a cycle, a wrong input length or a column produced twice is a startup
//! error under the model's key, never a field that fails at run time.

use std::collections::{BTreeMap, BTreeSet};

use liveomics_adapters::Invalid;

/// A per-cell model as the graph sees it.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub name: String,
    /// `inference.models[i]`: every error is filed under it.
    pub key: String,
    /// The full column names it adds (`{model}.{output}`).
    pub outputs: Vec<String>,
    /// For a cell-table model: the columns it reads as declared (names, or `prefix*`), and the
    /// key they were declared under (`….columns`, or the description's
    /// `config.liveomics.columns` at `….path`).
    pub reads: Option<Reads>,
}

#[derive(Debug, Clone)]
pub(crate) struct Reads {
    pub patterns: Vec<String>,
    pub key: String,
    /// The input's fixed vector length, when the description fixes it.
    pub length: Option<usize>,
}

/// The resolved graph: per-cell models in an order where every model runs after what it reads,
/// and the exact columns each cell-table model reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Plan {
    pub order: Vec<String>,
    pub inputs: BTreeMap<String, Vec<String>>,
}

/// Resolves `nodes` (in config order) against the columns the table already has when the
/// inference stage starts (`base`: the measure stage's, in table order). Every problem is
/// reported, each under its key.
pub(crate) fn resolve(base: &[String], nodes: &[Node]) -> Result<Plan, Vec<Invalid>> {
    let mut errors = Vec::new();
    // Columns are produced once: by the measure stage or by one model output.
    let mut producer: BTreeMap<&str, Option<&str>> = base.iter().map(|c| (c.as_str(), None)).collect();
    for n in nodes {
        for c in &n.outputs {
            match producer.get(c.as_str()) {
                Some(None) => errors.push(Invalid::new(
                    &format!("{}.name", n.key),
                    format!("output column {c:?} is already a measurement column; rename the model"),
                )),
                Some(Some(other)) if *other == n.name => errors.push(Invalid::new(
                    &format!("{}.path", n.key),
                    format!("two outputs of {:?} become the same column {c:?}", n.name),
                )),
                Some(Some(other)) => errors.push(Invalid::new(
                    &format!("{}.name", n.key),
                    format!("output column {c:?} is also produced by model {other:?}"),
                )),
                None => {
                    producer.insert(c, Some(&n.name));
                }
            }
        }
    }
    // Every column in the order the table will hold it: measurements, then models in config order.
    let all: Vec<&str> = base
        .iter()
        .map(String::as_str)
        .chain(nodes.iter().flat_map(|n| n.outputs.iter().map(String::as_str)))
        .collect();
    let mut inputs = BTreeMap::new();
    let mut needs: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for n in nodes {
        needs.entry(&n.name).or_default();
        let Some(r) = &n.reads else { continue };
        if r.patterns.is_empty() {
            errors.push(Invalid::new(
                &r.key,
                format!(
                    "cell-table model {:?} reads no columns: name them here or in its description's \
                     config.liveomics.columns",
                    n.name
                ),
            ));
            continue;
        }
        let mut cols = Vec::new();
        let mut unresolved = false;
        for (j, p) in r.patterns.iter().enumerate() {
            let matched: Vec<&str> = match p.strip_suffix('*') {
                Some(prefix) => all
                    .iter()
                    .copied()
                    .filter(|c| c.starts_with(prefix) && !n.outputs.iter().any(|o| o == c))
                    .collect(),
                None => all.iter().copied().filter(|c| *c == p).collect(),
            };
            if matched.is_empty() {
                unresolved = true;
                let models: Vec<&str> = nodes.iter().map(|m| m.name.as_str()).collect();
                errors.push(Invalid::new(
                    &format!("{}[{j}]", r.key),
                    format!(
                        "no per-cell column {p:?}: no measurement and no per-cell model produces it \
                         (models: {}; measurements: {})",
                        models.join(", "),
                        base.join(", ")
                    ),
                ));
            }
            for c in matched {
                if n.outputs.iter().any(|o| o == c) {
                    errors.push(Invalid::new(
                        &format!("{}[{j}]", r.key),
                        format!("{:?} reads its own output {c:?}", n.name),
                    ));
                } else if let Some(Some(from)) = producer.get(c) {
                    needs.entry(&n.name).or_default().insert(from);
                }
                cols.push(c.to_string());
            }
        }
        if let Some(len) = r.length {
            // Counted only once every name resolved: a missing column is said once, above.
            if cols.len() != len && !unresolved {
                errors.push(Invalid::new(
                    &r.key,
                    format!(
                        "{} columns for an input of length {len} ({})",
                        cols.len(),
                        preview(&cols)
                    ),
                ));
            }
        }
        inputs.insert(n.name.clone(), cols);
    }
    // Kahn's algorithm, taking the first ready model in config order each time: an order that
    // changes only where the graph demands it.
    let mut order = Vec::new();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    while order.len() < nodes.len() {
        let ready = nodes
            .iter()
            .find(|n| !done.contains(n.name.as_str()) && needs[n.name.as_str()].iter().all(|d| done.contains(d)));
        match ready {
            Some(n) => {
                done.insert(&n.name);
                order.push(n.name.clone());
            }
            None => {
                for n in nodes.iter().filter(|n| !done.contains(n.name.as_str())) {
                    let waits: Vec<&str> = needs[n.name.as_str()]
                        .iter()
                        .copied()
                        .filter(|d| !done.contains(d))
                        .collect();
                    let key = n.reads.as_ref().map_or(n.key.clone(), |r| r.key.clone());
                    errors.push(Invalid::new(
                        &key,
                        format!(
                            "{:?} is in a cycle: it reads outputs of {}, which read its own, directly or not",
                            n.name,
                            waits.join(", ")
                        ),
                    ));
                }
                break;
            }
        }
    }
    if errors.is_empty() {
        Ok(Plan { order, inputs })
    } else {
        Err(errors)
    }
}

fn preview(cols: &[String]) -> String {
    if cols.len() <= 6 {
        cols.join(", ")
    } else {
        format!("{}, … {}", cols[..4].join(", "), cols[cols.len() - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<String> {
        ["area_px", "mean_DAPI"].iter().map(|s| s.to_string()).collect()
    }

    fn cells(name: &str, i: usize, outs: &[&str]) -> Node {
        Node {
            name: name.into(),
            key: format!("inference.models[{i}]"),
            outputs: outs.iter().map(|o| format!("{name}.{o}")).collect(),
            reads: None,
        }
    }

    fn table(name: &str, i: usize, outs: &[&str], reads: &[&str], length: Option<usize>) -> Node {
        Node {
            reads: Some(Reads {
                patterns: reads.iter().map(|s| s.to_string()).collect(),
                key: format!("inference.models[{i}].columns"),
                length,
            }),
            ..cells(name, i, outs)
        }
    }

    fn keys(r: Result<Plan, Vec<Invalid>>) -> Vec<String> {
        r.expect_err("the graph must be refused")
            .iter()
            .map(|e| e.key.clone())
            .collect()
    }

    #[test]
    fn a_chain_runs_after_what_it_reads_whatever_the_config_order() {
        let nodes = [
            table("protein", 0, &["P1", "P2"], &["omics.*", "area_px"], Some(3)),
            table("score", 1, &["s"], &["protein.P1"], None),
            cells("omics", 2, &["G1", "G2"]),
        ];
        let plan = resolve(&base(), &nodes).expect("a valid graph");
        assert_eq!(plan.order, ["omics", "protein", "score"]);
        assert_eq!(plan.inputs["protein"], ["omics.G1", "omics.G2", "area_px"]);
        assert_eq!(plan.inputs["score"], ["protein.P1"]);
    }

    #[test]
    fn independent_models_keep_the_config_order() {
        let nodes = [
            cells("b", 0, &["x"]),
            cells("a", 1, &["x"]),
            table("t", 2, &["y"], &["mean_DAPI"], None),
        ];
        assert_eq!(resolve(&base(), &nodes).expect("valid").order, ["b", "a", "t"]);
    }

    #[test]
    fn a_missing_producer_is_named_under_the_column_that_reads_it() {
        let nodes = [table("protein", 0, &["P1"], &["area_px", "omics.G1", "nothing*"], None)];
        assert_eq!(
            keys(resolve(&base(), &nodes)),
            ["inference.models[0].columns[1]", "inference.models[0].columns[2]"]
        );
    }

    #[test]
    fn a_cycle_is_refused_for_every_model_in_it() {
        let nodes = [
            table("a", 0, &["x"], &["b.y"], None),
            table("b", 1, &["y"], &["a.x"], None),
            table("c", 2, &["z"], &["area_px"], None),
        ];
        let errs = resolve(&base(), &nodes).expect_err("a cycle");
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["inference.models[0].columns", "inference.models[1].columns"]);
        assert!(errs[0].message.contains("cycle"), "{}", errs[0].message);
    }

    #[test]
    fn reading_its_own_output_is_refused() {
        let nodes = [table("a", 0, &["x"], &["a.x"], None)];
        assert_eq!(keys(resolve(&base(), &nodes)), ["inference.models[0].columns[0]"]);
    }

    #[test]
    fn a_length_mismatch_names_the_columns() {
        let nodes = [
            cells("omics", 0, &["G1", "G2", "G3"]),
            table("p", 1, &["P"], &["omics.*"], Some(16)),
        ];
        let errs = resolve(&base(), &nodes).expect_err("3 columns for 16 inputs");
        assert_eq!(errs[0].key, "inference.models[1].columns");
        assert!(
            errs[0].message.contains("3 columns for an input of length 16"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn an_output_produced_twice_is_refused() {
        let mut dup = cells("m", 0, &["a", "a"]);
        dup.outputs[1] = "m.a".into();
        assert_eq!(keys(resolve(&base(), &[dup])), ["inference.models[0].path"]);
        let mut clash = cells("x", 1, &["y"]);
        clash.outputs = vec!["area_px".into()];
        assert_eq!(keys(resolve(&base(), &[clash])), ["inference.models[1].name"]);
    }

    #[test]
    fn a_table_model_that_reads_nothing_is_refused() {
        let nodes = [table("p", 0, &["P"], &[], None)];
        assert_eq!(keys(resolve(&base(), &nodes)), ["inference.models[0].columns"]);
    }
}
