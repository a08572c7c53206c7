//! The definitions of one object (namespace/name of a kind) across the
//! manifests, in claim order: the first one wins, the others are reported
//! as duplicates. Almost always exactly one, so a sorted vector, not a
//! map: an ordered map's first node alone takes ~700 bytes, which at
//! 10,000 Services was more than the objects' own slim copies.

use super::parse::Object;
use super::state::ClaimPos;

#[derive(Debug, Default)]
pub struct Claims(Vec<(ClaimPos, Object)>);

impl Claims {
    /// Adds (or replaces) the definition at `pos`.
    pub fn insert(&mut self, pos: ClaimPos, object: Object) {
        match self.0.binary_search_by(|(p, _)| p.cmp(&pos)) {
            Ok(i) => self.0[i].1 = object,
            Err(i) => {
                // One definition is the rule: no room for four.
                self.0.reserve_exact(1);
                self.0.insert(i, (pos, object))
            }
        }
    }

    pub fn remove(&mut self, pos: &ClaimPos) {
        if let Ok(i) = self.0.binary_search_by(|(p, _)| p.cmp(pos)) {
            self.0.remove(i);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Definitions in claim order (the winner first).
    pub fn iter(&self) -> impl Iterator<Item = (&ClaimPos, &Object)> {
        self.0.iter().map(|(pos, object)| (pos, object))
    }

    pub fn keys(&self) -> impl Iterator<Item = &ClaimPos> {
        self.0.iter().map(|(pos, _)| pos)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;
    use crate::source::slim::SlimSlice;

    fn pos(file: &str, doc: usize) -> ClaimPos {
        ((0, PathBuf::from(file)), doc, 0)
    }

    fn object() -> Object {
        Object::EndpointSlice(Arc::new(SlimSlice::from(
            k8s_openapi::api::discovery::v1::EndpointSlice::default(),
        )))
    }

    #[test]
    fn claims_stay_in_claim_order_whatever_the_insertion_order() {
        let mut c = Claims::default();
        c.insert(pos("b.yaml", 0), object());
        c.insert(pos("a.yaml", 2), object());
        c.insert(pos("a.yaml", 1), object());
        c.insert(pos("a.yaml", 1), object());
        let order: Vec<_> = c.keys().cloned().collect();
        assert_eq!(
            order,
            [pos("a.yaml", 1), pos("a.yaml", 2), pos("b.yaml", 0)]
        );
        c.remove(&pos("a.yaml", 1));
        c.remove(&pos("a.yaml", 9));
        assert_eq!(c.keys().next(), Some(&pos("a.yaml", 2)));
        c.remove(&pos("a.yaml", 2));
        c.remove(&pos("b.yaml", 0));
        assert!(c.is_empty());
    }
}
