//! Pagination: which slice of a list one page shows, so a page renders at most
//! [`PAGE_SIZE`] rows however long the list is.

/// Rows on one page.
pub const PAGE_SIZE: usize = 50;

/// One page of a list of `total` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// 1-based, clamped to the pages that exist.
    pub number: usize,
    /// Pages in all (at least 1, for an empty list).
    pub count: usize,
    /// The rows it shows.
    pub start: usize,
    pub end: usize,
}

impl Page {
    /// Page `requested` (1-based; 0 and past-the-end clamp) of `total` rows.
    pub fn of(requested: usize, total: usize, size: usize) -> Self {
        let size = size.max(1);
        let count = total.div_ceil(size).max(1);
        let number = requested.clamp(1, count);
        let start = ((number - 1) * size).min(total);
        let end = (start + size).min(total);
        Self {
            number,
            count,
            start,
            end,
        }
    }

    pub fn previous(&self) -> Option<usize> {
        (self.number > 1).then(|| self.number - 1)
    }

    pub fn next(&self) -> Option<usize> {
        (self.number < self.count).then(|| self.number + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_slice_and_clamp() {
        let p = Page::of(1, 120, 50);
        assert_eq!((p.number, p.count, p.start, p.end), (1, 3, 0, 50));
        assert_eq!((p.previous(), p.next()), (None, Some(2)));
        let p = Page::of(3, 120, 50);
        assert_eq!(
            (p.start, p.end, p.next(), p.previous()),
            (100, 120, None, Some(2))
        );
        assert_eq!(Page::of(99, 120, 50).number, 3, "past the end");
        assert_eq!(Page::of(0, 120, 50).number, 1);
        let empty = Page::of(5, 0, 50);
        assert_eq!(
            (empty.number, empty.count, empty.start, empty.end),
            (1, 1, 0, 0)
        );
        assert_eq!(Page::of(2, 100, 50).end, 100, "an exact multiple");
        assert_eq!(Page::of(2, 100, 50).next(), None);
    }
}
