//! A compact, fixed-layout binary encoding of akd's storage records (the aZKS head, tree nodes
//! and value states) for the rows of `store::TransparencyStore`. Decoding treats stored bytes
//! as untrusted: every length is checked and a bad row is an error, never a panic.
//! Not for: proofs on the wire (akd's own protobuf encoding is used there).

use akd::NodeLabel;
use akd::storage::types::{DbRecord, ValueState};
use akd::tree_node::{TreeNode, TreeNodeWithPreviousValue};

/// Encodes a tree record (aZKS head or tree node); value states go through [`encode_value`].
pub fn encode_node(record: &DbRecord) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(160);
    match record {
        DbRecord::Azks(azks) => {
            out.push(1);
            out.extend_from_slice(&azks.latest_epoch.to_be_bytes());
            out.extend_from_slice(&azks.num_nodes.to_be_bytes());
        }
        DbRecord::TreeNode(node) => {
            out.push(2);
            put_label(&mut out, &node.label);
            put_tree_node(&mut out, &node.latest_node);
            match &node.previous_node {
                Some(prev) => {
                    out.push(1);
                    put_tree_node(&mut out, prev);
                }
                None => out.push(0),
            }
        }
        DbRecord::ValueState(_) => return None,
    }
    Some(out)
}

/// Decodes what [`encode_node`] wrote.
pub fn decode_node(bytes: &[u8]) -> Result<DbRecord, String> {
    let mut r = Reader(bytes);
    let record = match r.u8()? {
        1 => DbRecord::Azks(DbRecord::build_azks(r.u64()?, r.u64()?)),
        2 => {
            let label = r.label()?;
            let latest = r.tree_node()?;
            let previous = match r.u8()? {
                0 => None,
                1 => Some(r.tree_node()?),
                t => return Err(format!("bad previous-node flag {t}")),
            };
            DbRecord::TreeNode(build_node(label, latest, previous))
        }
        t => return Err(format!("unknown akd record type {t}")),
    };
    r.finish()?;
    Ok(record)
}

/// Encodes a value state.
pub fn encode_value(state: &ValueState) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + state.value.0.len() + state.username.0.len());
    out.extend_from_slice(&state.version.to_be_bytes());
    out.extend_from_slice(&state.epoch.to_be_bytes());
    put_label(&mut out, &state.label);
    put_bytes(&mut out, &state.username.0);
    put_bytes(&mut out, &state.value.0);
    out
}

/// Decodes what [`encode_value`] wrote.
pub fn decode_value(bytes: &[u8]) -> Result<ValueState, String> {
    let mut r = Reader(bytes);
    let version = r.u64()?;
    let epoch = r.u64()?;
    let label = r.label()?;
    let username = r.bytes()?.to_vec();
    let value = r.bytes()?.to_vec();
    r.finish()?;
    Ok(DbRecord::build_user_state(
        username,
        value,
        version,
        label.label_len,
        label.label_val,
        epoch,
    ))
}

/// A tree node's fields as read, before akd's builder assembles them.
struct RawNode {
    last_epoch: u64,
    min_descendant_epoch: u64,
    parent: NodeLabel,
    node_type: u8,
    left: Option<NodeLabel>,
    right: Option<NodeLabel>,
    hash: [u8; 32],
}

fn build_node(
    label: NodeLabel,
    latest: RawNode,
    previous: Option<RawNode>,
) -> TreeNodeWithPreviousValue {
    let (p_last, p_min, p_parent_val, p_parent_len, p_type, p_left, p_right, p_hash) =
        match previous {
            Some(p) => (
                Some(p.last_epoch),
                Some(p.min_descendant_epoch),
                Some(p.parent.label_val),
                Some(p.parent.label_len),
                Some(p.node_type),
                p.left,
                p.right,
                Some(p.hash),
            ),
            None => (None, None, None, None, None, None, None, None),
        };
    DbRecord::build_tree_node_with_previous_value(
        label.label_val,
        label.label_len,
        latest.last_epoch,
        latest.min_descendant_epoch,
        latest.parent.label_val,
        latest.parent.label_len,
        latest.node_type,
        latest.left,
        latest.right,
        latest.hash,
        p_last,
        p_min,
        p_parent_val,
        p_parent_len,
        p_type,
        p_left,
        p_right,
        p_hash,
    )
}

fn put_label(out: &mut Vec<u8>, label: &NodeLabel) {
    out.extend_from_slice(&label.label_len.to_be_bytes());
    out.extend_from_slice(&label.label_val);
}

fn put_opt_label(out: &mut Vec<u8>, label: Option<&NodeLabel>) {
    match label {
        Some(l) => {
            out.push(1);
            put_label(out, l);
        }
        None => out.push(0),
    }
}

fn put_tree_node(out: &mut Vec<u8>, node: &TreeNode) {
    out.extend_from_slice(&node.last_epoch.to_be_bytes());
    out.extend_from_slice(&node.min_descendant_epoch.to_be_bytes());
    put_label(out, &node.parent);
    out.push(node.node_type as u8);
    put_opt_label(out, node.left_child.as_ref());
    put_opt_label(out, node.right_child.as_ref());
    out.extend_from_slice(&node.hash.0);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated akd record".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn label(&mut self) -> Result<NodeLabel, String> {
        let len = self.u32()?;
        Ok(NodeLabel::new(self.array()?, len))
    }
    fn opt_label(&mut self) -> Result<Option<NodeLabel>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.label()?)),
            t => Err(format!("bad child flag {t}")),
        }
    }
    fn tree_node(&mut self) -> Result<RawNode, String> {
        let last_epoch = self.u64()?;
        let min_descendant_epoch = self.u64()?;
        let parent = self.label()?;
        let node_type = self.u8()?;
        if !(1..=3).contains(&node_type) {
            return Err(format!("bad node type {node_type}"));
        }
        Ok(RawNode {
            last_epoch,
            min_descendant_epoch,
            parent,
            node_type,
            left: self.opt_label()?,
            right: self.opt_label()?,
            hash: self.array()?,
        })
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = usize::try_from(self.u32()?).map_err(|_| "length overflow".to_string())?;
        self.take(len)
    }
    fn finish(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err("trailing bytes after an akd record".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use akd::tree_node::TreeNodeType;
    use akd::{AkdLabel, AkdValue, Azks, AzksValue};

    fn node(n: u8, with_children: bool) -> TreeNode {
        TreeNode {
            label: NodeLabel::new([n; 32], 7),
            last_epoch: 9,
            min_descendant_epoch: 3,
            parent: NodeLabel::new([n + 1; 32], 6),
            node_type: TreeNodeType::Interior,
            left_child: with_children.then(|| NodeLabel::new([n + 2; 32], 8)),
            right_child: with_children.then(|| NodeLabel::new([n + 3; 32], 8)),
            hash: AzksValue([n + 4; 32]),
        }
    }

    #[test]
    fn records_round_trip() {
        let records = [
            DbRecord::Azks(Azks {
                latest_epoch: 5,
                num_nodes: 77,
            }),
            DbRecord::TreeNode(TreeNodeWithPreviousValue {
                label: NodeLabel::new([1; 32], 7),
                latest_node: node(1, true),
                previous_node: Some(node(1, false)),
            }),
            DbRecord::TreeNode(TreeNodeWithPreviousValue {
                label: NodeLabel::new([1; 32], 7),
                latest_node: node(1, false),
                previous_node: None,
            }),
        ];
        for record in records {
            let bytes = encode_node(&record).unwrap();
            assert_eq!(decode_node(&bytes).unwrap(), record);
        }
        let state =
            DbRecord::build_user_state(b"alice".to_vec(), b"v".to_vec(), 2, 256, [3; 32], 4);
        assert_eq!(decode_value(&encode_value(&state)).unwrap(), state);
        assert_eq!(state.username, AkdLabel(b"alice".to_vec()));
        assert_eq!(state.value, AkdValue(b"v".to_vec()));
    }

    #[test]
    fn damaged_rows_are_errors_not_panics() {
        let state =
            DbRecord::build_user_state(b"alice".to_vec(), b"v".to_vec(), 2, 256, [3; 32], 4);
        let bytes = encode_value(&state);
        for cut in 0..bytes.len() {
            assert!(decode_value(&bytes[..cut]).is_err());
        }
        assert!(decode_node(&[9]).is_err());
        assert!(decode_node(&[]).is_err());
    }
}
