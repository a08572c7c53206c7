//! Allocation of backend and frontend ids: lowest free id first, so ids
//! stay small and are reused; 0 is never handed out (it means "none" in
//! the datapath).

use std::collections::BTreeSet;

#[derive(Clone, Debug)]
pub struct IdAllocator {
    /// Every id below `next` that is not in `free` is in use.
    next: u32,
    free: BTreeSet<u32>,
}

impl Default for IdAllocator {
    fn default() -> Self {
        IdAllocator {
            next: 1,
            free: BTreeSet::new(),
        }
    }
}

impl IdAllocator {
    /// An allocator that considers `used` taken (ids read back from maps).
    pub fn from_used(used: impl IntoIterator<Item = u32>) -> IdAllocator {
        let used: BTreeSet<u32> = used.into_iter().filter(|id| *id != 0).collect();
        let next = used.last().map_or(1, |max| max + 1);
        let free = (1..next).filter(|id| !used.contains(id)).collect();
        IdAllocator { next, free }
    }

    /// The lowest free id; None when the id space is exhausted.
    pub fn allocate(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        let id = self.next;
        self.next = self.next.checked_add(1)?;
        Some(id)
    }

    pub fn release(&mut self, id: u32) {
        if id != 0 && id < self.next {
            self.free.insert(id);
        }
    }

    /// Ids currently handed out.
    pub fn in_use(&self) -> usize {
        (self.next - 1) as usize - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_from_one_and_reuses_the_lowest_released_id() {
        let mut ids = IdAllocator::default();
        assert_eq!(
            (ids.allocate(), ids.allocate(), ids.allocate()),
            (Some(1), Some(2), Some(3))
        );
        ids.release(2);
        ids.release(1);
        assert_eq!(ids.allocate(), Some(1));
        assert_eq!(ids.allocate(), Some(2));
        assert_eq!(ids.allocate(), Some(4));
        assert_eq!(ids.in_use(), 4);
    }

    #[test]
    fn restored_allocator_fills_gaps_before_growing() {
        let mut ids = IdAllocator::from_used([5, 2, 0]);
        assert_eq!(ids.in_use(), 2);
        assert_eq!(ids.allocate(), Some(1));
        assert_eq!(ids.allocate(), Some(3));
        assert_eq!(ids.allocate(), Some(4));
        assert_eq!(ids.allocate(), Some(6));
    }
}
