//! Non-overlapping address ranges kept in a map by start: the mappings below RAM (`mm`) and
//! in the high window (`high`) share how they are found and cut.

use std::collections::BTreeMap;

/// A mapping: its range, and the part of it inside another range.
pub trait Span: Clone {
    fn start(&self) -> u64;
    fn end(&self) -> u64;
    /// The part inside `[start, end)` (which must overlap it), its attributes moved along.
    fn piece(&self, start: u64, end: u64) -> Self;
}

/// The spans of `map` overlapping `[start, end)`, in address order.
pub fn overlapping<V: Span>(
    map: &BTreeMap<u64, V>,
    start: u64,
    end: u64,
) -> impl Iterator<Item = &V> {
    let before = map
        .range(..start)
        .next_back()
        .map(|(_, v)| v)
        .filter(|v| v.end() > start);
    before
        .into_iter()
        .chain(map.range(start..end).map(|(_, v)| v))
}

/// Removes `[start, end)` from `map`, splitting spans that straddle its edges; returns the
/// pieces that were inside it.
pub fn cut_out<V: Span>(map: &mut BTreeMap<u64, V>, start: u64, end: u64) -> Vec<V> {
    let hit: Vec<V> = overlapping(map, start, end).cloned().collect();
    let mut removed = Vec::with_capacity(hit.len());
    for span in hit {
        map.remove(&span.start());
        if span.start() < start {
            map.insert(span.start(), span.piece(span.start(), start));
        }
        if span.end() > end {
            map.insert(end, span.piece(end, span.end()));
        }
        removed.push(span.piece(start, end));
    }
    removed
}
