//! Name lookup over a list kept in file order, without copying the names.

/// Positions of a list's items, sorted by the items' names.
#[derive(Debug)]
pub(super) struct NameIndex(Vec<usize>);

impl NameIndex {
    /// Indexes `items` by `name`, or returns the first name that occurs twice.
    pub(super) fn build<'a, T>(items: &'a [T], name: impl Fn(&'a T) -> &'a str) -> Result<Self, &'a str> {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_unstable_by(|&a, &b| name(&items[a]).cmp(name(&items[b])));
        if let Some(pair) = order.windows(2).find(|p| name(&items[p[0]]) == name(&items[p[1]])) {
            return Err(name(&items[pair[0]]));
        }
        Ok(Self(order))
    }

    pub(super) fn find<'a, T>(&self, items: &'a [T], name: impl Fn(&'a T) -> &'a str, key: &str) -> Option<&'a T> {
        let at = self.0.binary_search_by(|&i| name(&items[i]).cmp(key)).ok()?;
        Some(&items[self.0[at]])
    }
}
