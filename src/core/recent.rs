//! Per-org state bounded by `limits.max_tracked_orgs`: when full, a new org takes the place of
//! the org recorded least recently. Reads do not count as use, so an admin polling an org does
//! not keep it in. Every operation is O(log orgs) at worst.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone)]
pub struct RecentOrgs<V> {
    max: usize,
    /// Each org's value and its `seq` at its latest record: its key in `order`.
    entries: HashMap<String, (u64, V)>,
    /// Recency order: `seq` → org, oldest first.
    order: BTreeMap<u64, String>,
    seq: u64,
}

impl<V> RecentOrgs<V> {
    pub fn new(max: usize) -> Self {
        RecentOrgs {
            max,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            seq: 0,
        }
    }

    /// `org`'s value to record into, made by `make` if the org is new, and the org marked as
    /// the most recently recorded; `None` when no org is tracked at all (`max` 0).
    pub fn record(&mut self, org: &str, make: impl FnOnce() -> V) -> Option<&mut V> {
        if self.max == 0 {
            return None;
        }
        self.seq += 1;
        let seq = self.seq;
        if self.entries.contains_key(org) {
            let entry = self.entries.get_mut(org).expect("just seen");
            let name = self
                .order
                .remove(&entry.0)
                .unwrap_or_else(|| org.to_owned());
            self.order.insert(seq, name);
            entry.0 = seq;
            return Some(&mut entry.1);
        }
        self.evict_to(self.max - 1);
        self.order.insert(seq, org.to_owned());
        Some(
            &mut self
                .entries
                .entry(org.to_owned())
                .or_insert((seq, make()))
                .1,
        )
    }

    pub fn get(&self, org: &str) -> Option<&V> {
        self.entries.get(org).map(|(_, v)| v)
    }

    /// A new bound; a lower one drops the least recently recorded orgs at once.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
        self.evict_to(max);
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every tracked org, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.entries.iter().map(|(k, (_, v))| (k, v))
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.entries.values_mut().map(|(_, v)| v)
    }

    /// Every tracked org has exactly one place in the recency order.
    #[cfg(test)]
    pub(crate) fn is_consistent(&self) -> bool {
        self.order.len() == self.entries.len()
            && self
                .order
                .iter()
                .all(|(seq, org)| self.entries.get(org).is_some_and(|e| e.0 == *seq))
    }

    fn evict_to(&mut self, keep: usize) {
        while self.entries.len() > keep {
            match self.order.pop_first() {
                Some((_, org)) => {
                    self.entries.remove(&org);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_new_org_takes_the_place_of_the_least_recently_recorded() {
        let mut r = RecentOrgs::new(2);
        *r.record("a", || 0).unwrap() += 1;
        *r.record("b", || 0).unwrap() += 1;
        // Reading "a" does not keep it in; recording "b" again does.
        assert_eq!(r.get("a"), Some(&1));
        *r.record("b", || 0).unwrap() += 1;
        *r.record("c", || 0).unwrap() += 1;
        assert_eq!(r.get("a"), None);
        assert_eq!(r.get("b"), Some(&2));
        assert_eq!(r.get("c"), Some(&1));
    }

    #[test]
    fn zero_tracks_nothing_and_a_lower_bound_evicts_at_once() {
        let mut r = RecentOrgs::<u32>::new(0);
        assert!(r.record("a", || 0).is_none());
        assert!(r.is_empty());
        r.set_max(3);
        for org in ["a", "b", "c"] {
            r.record(org, || 0);
        }
        r.set_max(1);
        assert_eq!(r.len(), 1);
        assert!(r.get("c").is_some());
    }

    proptest! {
        /// Against a plain list kept in recency order: the same orgs are tracked, never more
        /// than the bound.
        #[test]
        fn matches_a_recency_list(max in 0usize..5, ops in proptest::collection::vec(0u8..8, 0..60)) {
            let mut r = RecentOrgs::new(max);
            let mut model: Vec<String> = Vec::new();
            for op in ops {
                let org = format!("org-{op}");
                let made = r.record(&org, || ()).is_some();
                prop_assert_eq!(made, max > 0);
                if max > 0 {
                    model.retain(|o| o != &org);
                    model.push(org);
                    if model.len() > max {
                        model.remove(0);
                    }
                }
                prop_assert!(r.len() <= max);
                prop_assert!(r.is_consistent());
                let mut tracked: Vec<&String> = r.iter().map(|(k, _)| k).collect();
                tracked.sort();
                let mut expected: Vec<&String> = model.iter().collect();
                expected.sort();
                prop_assert_eq!(tracked, expected);
            }
        }
    }
}
