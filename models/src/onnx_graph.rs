//! One edit of an ONNX graph, made on its protobuf bytes before the session is created: keep
//! only the first half of the inputs of the Concat that makes the graph's output, and drop every
//! node and initializer that only the other half needed.
//!
//! Why: InstanSeg's network is one encoder and two decoders (nuclei, then cells) whose outputs
//! are concatenated. When the cells come from elsewhere (propagated over a cytoplasm channel,
//! the daemon's default) the cell decoder is a third of the network's work for nothing, and ONNX
//! Runtime runs every node of a graph whichever outputs are fetched. Cutting it here keeps one
//! model file in the repository instead of a second, pruned export.
//!
//! Only the fields the edit touches are decoded; everything else is copied byte for byte, so
//! fields this reader does not know survive.

/// Why the graph could not be cut; the caller runs the whole graph instead.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("not a valid protobuf message ({0})")]
    Malformed(&'static str),
    #[error("{0}")]
    Unsupported(String),
}

const WIRE_VARINT: u8 = 0;
const WIRE_I64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_I32: u8 = 5;

// Field numbers of onnx.proto (ModelProto, GraphProto, NodeProto, ValueInfoProto, TypeProto,
// TensorProto, AttributeProto).
const MODEL_GRAPH: u32 = 7;
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const GRAPH_OUTPUT: u32 = 12;
const GRAPH_VALUE_INFO: u32 = 13;
const NODE_INPUT: u32 = 1;
const NODE_OUTPUT: u32 = 2;
const NODE_OP_TYPE: u32 = 4;
const NODE_ATTRIBUTE: u32 = 5;
const ATTRIBUTE_GRAPH: u32 = 6;
const ATTRIBUTE_GRAPHS: u32 = 11;
const VALUE_INFO_NAME: u32 = 1;
const VALUE_INFO_TYPE: u32 = 2;
const TYPE_TENSOR: u32 = 1;
const TENSOR_TYPE_SHAPE: u32 = 2;
const TENSOR_NAME: u32 = 8;

/// One field of a message: its number, wire type, the whole encoding (key included, to copy it
/// unchanged) and, for length-delimited fields, the payload.
#[derive(Debug, Clone, Copy)]
struct Field<'a> {
    number: u32,
    wire: u8,
    raw: &'a [u8],
    payload: &'a [u8],
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, GraphError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or(GraphError::Malformed("truncated varint"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(GraphError::Malformed("varint longer than 10 bytes"))
}

fn fields(buf: &[u8]) -> Result<Vec<Field<'_>>, GraphError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let key = varint(buf, &mut pos)?;
        let wire = (key & 7) as u8;
        let number = u32::try_from(key >> 3).map_err(|_| GraphError::Malformed("field number"))?;
        let mut payload: &[u8] = &[];
        match wire {
            WIRE_VARINT => {
                varint(buf, &mut pos)?;
            }
            WIRE_I64 => pos += 8,
            WIRE_I32 => pos += 4,
            WIRE_LEN => {
                let len = usize::try_from(varint(buf, &mut pos)?).map_err(|_| GraphError::Malformed("length"))?;
                let end = pos.checked_add(len).ok_or(GraphError::Malformed("length"))?;
                payload = buf.get(pos..end).ok_or(GraphError::Malformed("truncated field"))?;
                pos = end;
            }
            _ => return Err(GraphError::Malformed("group or unknown wire type")),
        }
        let raw = buf.get(start..pos).ok_or(GraphError::Malformed("truncated field"))?;
        out.push(Field {
            number,
            wire,
            raw,
            payload,
        });
    }
    Ok(out)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_len(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    put_varint(out, (u64::from(number) << 3) | u64::from(WIRE_LEN));
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

fn text(f: &Field<'_>) -> Result<String, GraphError> {
    std::str::from_utf8(f.payload)
        .map(str::to_owned)
        .map_err(|_| GraphError::Malformed("a name is not UTF-8"))
}

/// The strings of field `number` (wire type 2) in `fields`, in order.
fn strings(fields: &[Field<'_>], number: u32) -> Result<Vec<String>, GraphError> {
    fields
        .iter()
        .filter(|f| f.number == number && f.wire == WIRE_LEN)
        .map(text)
        .collect()
}

struct Node<'a> {
    fields: Vec<Field<'a>>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    op_type: String,
}

impl<'a> Node<'a> {
    fn parse(payload: &'a [u8]) -> Result<Self, GraphError> {
        let fields = fields(payload)?;
        let op_type = strings(&fields, NODE_OP_TYPE)?.pop().unwrap_or_default();
        for a in fields
            .iter()
            .filter(|f| f.number == NODE_ATTRIBUTE && f.wire == WIRE_LEN)
        {
            // A subgraph may read any outer name; this edit does not follow them.
            if crate::onnx_graph::fields(a.payload)?
                .iter()
                .any(|f| f.number == ATTRIBUTE_GRAPH || f.number == ATTRIBUTE_GRAPHS)
            {
                return Err(GraphError::Unsupported(format!(
                    "node {op_type} has a subgraph; the graph is left whole"
                )));
            }
        }
        Ok(Self {
            inputs: strings(&fields, NODE_INPUT)?,
            outputs: strings(&fields, NODE_OUTPUT)?,
            op_type,
            fields,
        })
    }

    /// The node again with only its first `keep` inputs.
    fn with_inputs(&self, keep: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut seen = 0;
        for f in &self.fields {
            if f.number == NODE_INPUT {
                seen += 1;
                if seen > keep {
                    continue;
                }
            }
            out.extend_from_slice(f.raw);
        }
        out
    }
}

/// The graph output with its shape left out: its channel count changes, and ONNX Runtime infers
/// the new one (an element type without a shape is valid ONNX).
fn output_without_shape(payload: &[u8]) -> Result<Vec<u8>, GraphError> {
    let mut out = Vec::with_capacity(payload.len());
    for f in fields(payload)? {
        if f.number != VALUE_INFO_TYPE {
            out.extend_from_slice(f.raw);
            continue;
        }
        let mut ty = Vec::new();
        for t in fields(f.payload)? {
            if t.number != TYPE_TENSOR {
                ty.extend_from_slice(t.raw);
                continue;
            }
            let mut tensor = Vec::new();
            for s in fields(t.payload)?.iter().filter(|s| s.number != TENSOR_TYPE_SHAPE) {
                tensor.extend_from_slice(s.raw);
            }
            put_len(&mut ty, TYPE_TENSOR, &tensor);
        }
        put_len(&mut out, VALUE_INFO_TYPE, &ty);
    }
    Ok(out)
}

/// `model` (ONNX protobuf bytes) cut to the first half of the inputs of the Concat that makes its
/// only output: for InstanSeg, the nuclei decoder without the cells'. Returns the new bytes and
/// how many nodes were dropped.
pub fn keep_first_half_of_output(model: &[u8]) -> Result<(Vec<u8>, usize), GraphError> {
    let top = fields(model)?;
    let graphs: Vec<&Field<'_>> = top
        .iter()
        .filter(|f| f.number == MODEL_GRAPH && f.wire == WIRE_LEN)
        .collect();
    let [graph] = graphs.as_slice() else {
        return Err(GraphError::Malformed("a model has one graph"));
    };
    let g = fields(graph.payload)?;
    let mut outputs = Vec::new();
    for f in g.iter().filter(|f| f.number == GRAPH_OUTPUT && f.wire == WIRE_LEN) {
        outputs.push(strings(&fields(f.payload)?, VALUE_INFO_NAME)?.pop().unwrap_or_default());
    }
    let [output] = outputs.as_slice() else {
        return Err(GraphError::Unsupported(format!(
            "the graph has {} outputs; one is needed",
            outputs.len()
        )));
    };
    let nodes: Vec<Node<'_>> = g
        .iter()
        .filter(|f| f.number == GRAPH_NODE && f.wire == WIRE_LEN)
        .map(|f| Node::parse(f.payload))
        .collect::<Result<_, _>>()?;
    let last = nodes
        .iter()
        .position(|n| n.outputs.iter().any(|o| o == output))
        .ok_or_else(|| GraphError::Unsupported(format!("no node makes the output {output:?}")))?;
    let concat = &nodes[last];
    let n = concat.inputs.len();
    if concat.op_type != "Concat" || n < 2 || !n.is_multiple_of(2) {
        return Err(GraphError::Unsupported(format!(
            "the output comes from {} with {n} inputs, not a Concat of two halves",
            concat.op_type
        )));
    }
    let keep_inputs = n / 2;
    // Nodes are in topological order: walking back from the output, a node is kept when a kept
    // node reads one of its outputs.
    let mut needed: std::collections::HashSet<&str> = concat.inputs[..keep_inputs].iter().map(String::as_str).collect();
    let mut kept = vec![false; nodes.len()];
    kept[last] = true;
    for (i, node) in nodes.iter().enumerate().rev() {
        if i == last || !node.outputs.iter().any(|o| needed.contains(o.as_str())) {
            continue;
        }
        kept[i] = true;
        needed.extend(node.inputs.iter().filter(|s| !s.is_empty()).map(String::as_str));
    }
    needed.insert(output.as_str());
    let dropped = kept.iter().filter(|k| !**k).count();

    let mut graph_out = Vec::with_capacity(graph.payload.len());
    let mut node_index = 0;
    for f in &g {
        match f.number {
            GRAPH_NODE if f.wire == WIRE_LEN => {
                let i = node_index;
                node_index += 1;
                if i == last {
                    put_len(&mut graph_out, GRAPH_NODE, &nodes[i].with_inputs(keep_inputs));
                } else if kept[i] {
                    graph_out.extend_from_slice(f.raw);
                }
            }
            GRAPH_INITIALIZER | GRAPH_VALUE_INFO if f.wire == WIRE_LEN => {
                let name_field = if f.number == GRAPH_INITIALIZER {
                    TENSOR_NAME
                } else {
                    VALUE_INFO_NAME
                };
                let name = strings(&fields(f.payload)?, name_field)?.pop().unwrap_or_default();
                if needed.contains(name.as_str()) {
                    graph_out.extend_from_slice(f.raw);
                }
            }
            GRAPH_OUTPUT if f.wire == WIRE_LEN => {
                put_len(&mut graph_out, GRAPH_OUTPUT, &output_without_shape(f.payload)?)
            }
            _ => graph_out.extend_from_slice(f.raw),
        }
    }
    let mut out = Vec::with_capacity(model.len());
    for f in &top {
        if f.number == MODEL_GRAPH && f.wire == WIRE_LEN {
            put_len(&mut out, MODEL_GRAPH, &graph_out);
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    Ok((out, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(inputs: &[&str], outputs: &[&str], op: &str) -> Vec<u8> {
        let mut n = Vec::new();
        for i in inputs {
            put_len(&mut n, NODE_INPUT, i.as_bytes());
        }
        for o in outputs {
            put_len(&mut n, NODE_OUTPUT, o.as_bytes());
        }
        put_len(&mut n, NODE_OP_TYPE, op.as_bytes());
        n
    }

    fn initializer(name: &str) -> Vec<u8> {
        let mut t = Vec::new();
        put_len(&mut t, TENSOR_NAME, name.as_bytes());
        t
    }

    fn value_info(name: &str, with_shape: bool) -> Vec<u8> {
        let mut tensor = Vec::new();
        put_varint(&mut tensor, u64::from(1u32 << 3)); // elem_type = FLOAT
        put_varint(&mut tensor, 1);
        if with_shape {
            put_len(&mut tensor, TENSOR_TYPE_SHAPE, b"\x0a\x02\x08\x0a");
        }
        let mut ty = Vec::new();
        put_len(&mut ty, TYPE_TENSOR, &tensor);
        let mut v = Vec::new();
        put_len(&mut v, VALUE_INFO_NAME, name.as_bytes());
        put_len(&mut v, VALUE_INFO_TYPE, &ty);
        v
    }

    /// x -> enc -> (a -> a2, b) -> concat(a2, b): cutting keeps enc, a and a2, drops b.
    fn two_branch_model() -> Vec<u8> {
        let mut g = Vec::new();
        for (i, o, op) in [
            (&["x", "w_enc"][..], &["e"][..], "Conv"),
            (&["e", "w_a"], &["a"], "Conv"),
            (&["a"], &["a2"], "Relu"),
            (&["e", "w_b"], &["b"], "Conv"),
            (&["a2", "b"], &["y"], "Concat"),
        ] {
            put_len(&mut g, GRAPH_NODE, &node(i, o, op));
        }
        for w in ["w_enc", "w_a", "w_b"] {
            put_len(&mut g, GRAPH_INITIALIZER, &initializer(w));
        }
        put_len(&mut g, 11, &value_info("x", true));
        put_len(&mut g, GRAPH_OUTPUT, &value_info("y", true));
        put_len(&mut g, GRAPH_VALUE_INFO, &value_info("b", false));
        put_len(&mut g, GRAPH_VALUE_INFO, &value_info("a", false));
        let mut m = Vec::new();
        put_varint(&mut m, 1 << 3); // ir_version
        put_varint(&mut m, 8);
        put_len(&mut m, MODEL_GRAPH, &g);
        put_len(&mut m, 2, b"a producer the reader does not decode");
        m
    }

    #[test]
    fn the_second_branch_and_its_weights_go_everything_else_stays() {
        let (cut, dropped) = keep_first_half_of_output(&two_branch_model()).unwrap();
        assert_eq!(dropped, 1);
        let top = fields(&cut).unwrap();
        assert_eq!(top.len(), 3, "ir_version, graph, producer kept in order");
        assert_eq!(top[2].payload, b"a producer the reader does not decode");
        let g = fields(top[1].payload).unwrap();
        let nodes: Vec<Node<'_>> = g
            .iter()
            .filter(|f| f.number == GRAPH_NODE)
            .map(|f| Node::parse(f.payload).unwrap())
            .collect();
        let ops: Vec<&str> = nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Conv", "Conv", "Relu", "Concat"]);
        assert_eq!(nodes[3].inputs, ["a2"]);
        let inits: Vec<String> = g
            .iter()
            .filter(|f| f.number == GRAPH_INITIALIZER)
            .map(|f| strings(&fields(f.payload).unwrap(), TENSOR_NAME).unwrap().remove(0))
            .collect();
        assert_eq!(inits, ["w_enc", "w_a"]);
        let infos: Vec<String> = g
            .iter()
            .filter(|f| f.number == GRAPH_VALUE_INFO)
            .map(|f| strings(&fields(f.payload).unwrap(), VALUE_INFO_NAME).unwrap().remove(0))
            .collect();
        assert_eq!(infos, ["a"]);
        // The input keeps its shape, the output loses it.
        let shape_of = |number: u32| {
            let f = g.iter().find(|f| f.number == number).unwrap();
            let ty = fields(f.payload)
                .unwrap()
                .into_iter()
                .find(|f| f.number == VALUE_INFO_TYPE)
                .unwrap();
            let tensor = fields(ty.payload).unwrap()[0];
            fields(tensor.payload)
                .unwrap()
                .iter()
                .any(|f| f.number == TENSOR_TYPE_SHAPE)
        };
        assert!(shape_of(11));
        assert!(!shape_of(GRAPH_OUTPUT));
    }

    #[test]
    fn graphs_it_cannot_cut_are_refused_with_the_reason() {
        assert!(matches!(
            keep_first_half_of_output(b"\x3a\x05ab"),
            Err(GraphError::Malformed(_))
        ));
        let mut g = Vec::new();
        put_len(&mut g, GRAPH_NODE, &node(&["x", "y", "z"], &["o"], "Concat"));
        put_len(&mut g, GRAPH_OUTPUT, &value_info("o", true));
        let mut m = Vec::new();
        put_len(&mut m, MODEL_GRAPH, &g);
        let e = keep_first_half_of_output(&m).unwrap_err().to_string();
        assert!(e.contains("Concat with 3 inputs"), "{e}");
        let mut g = Vec::new();
        put_len(&mut g, GRAPH_NODE, &node(&["x"], &["o"], "Relu"));
        put_len(&mut g, GRAPH_OUTPUT, &value_info("o", true));
        let mut m = Vec::new();
        put_len(&mut m, MODEL_GRAPH, &g);
        let e = keep_first_half_of_output(&m).unwrap_err().to_string();
        assert!(e.contains("Relu with 1 inputs"), "{e}");
    }
}
