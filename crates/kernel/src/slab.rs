//! A table of kernel objects (sockets, epoll instances, event counters …) that descriptions
//! refer to by index, with how many descriptions refer to each: the object goes with the
//! last one. Indices are reused, and the table clones with the process state for a fork.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry<T> {
    value: T,
    refs: u32,
}

/// Objects of one kind, by id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Slab<T> {
    entries: Vec<Option<Entry<T>>>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    /// Adds an object referred to by one description; returns its id.
    pub fn insert(&mut self, value: T) -> usize {
        let entry = Some(Entry { value, refs: 1 });
        match self.entries.iter().position(Option::is_none) {
            Some(id) => {
                self.entries[id] = entry;
                id
            }
            None => {
                self.entries.push(entry);
                self.entries.len() - 1
            }
        }
    }

    pub fn get(&self, id: usize) -> Option<&T> {
        self.entries.get(id)?.as_ref().map(|e| &e.value)
    }

    pub fn get_mut(&mut self, id: usize) -> Option<&mut T> {
        self.entries.get_mut(id)?.as_mut().map(|e| &mut e.value)
    }

    /// Another description refers to `id` (a descriptor passed over a socket).
    pub fn retain(&mut self, id: usize) {
        if let Some(Some(entry)) = self.entries.get_mut(id) {
            entry.refs += 1;
        }
    }

    /// A description of `id` closed; returns the object when that was the last one.
    pub fn release(&mut self, id: usize) -> Option<T> {
        let entry = self.entries.get_mut(id)?.as_mut()?;
        entry.refs = entry.refs.saturating_sub(1);
        if entry.refs > 0 {
            return None;
        }
        self.entries[id].take().map(|e| e.value)
    }

    /// Ids and objects, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(id, e)| e.as_ref().map(|e| (id, &e.value)))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut T)> {
        self.entries
            .iter_mut()
            .enumerate()
            .filter_map(|(id, e)| e.as_mut().map(|e| (id, &mut e.value)))
    }

    pub fn len(&self) -> usize {
        self.entries.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_go_with_their_last_reference_and_ids_are_reused() {
        let mut slab = Slab::default();
        let a = slab.insert("a");
        let b = slab.insert("b");
        slab.retain(a);
        assert_eq!(slab.release(a), None);
        assert_eq!(slab.release(a), Some("a"));
        assert_eq!(slab.get(a), None);
        assert_eq!(slab.insert("c"), a);
        assert_eq!(slab.len(), 2);
        assert_eq!(slab.get(b), Some(&"b"));
    }
}
