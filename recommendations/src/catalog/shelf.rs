//! How a category's books are kept: packed, one small entry per book and every title in one
//! buffer, filled through a [`Builder`] that checks each book on the way in.

use std::collections::HashSet;

use super::{Book, Catalog, CatalogError, Category, MAX_TITLE_CHARS};

/// The books of one category, packed: a 12-byte entry per book and every title in one buffer,
/// so drawing a book reads one entry and one run of the buffer. A `Vec<Book>` held an allocation
/// per title besides: 1,000,000 books took 83 MiB that way, 46 MiB packed
/// (docs/performance.md).
#[derive(Debug, Clone, Default)]
pub(super) struct Shelf {
    entries: Vec<Entry>,
    /// Every title of the shelf, one after another.
    titles: String,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    id: i32,
    /// Where the title starts in [`Shelf::titles`], and its length in bytes. A title is at most
    /// [`MAX_TITLE_CHARS`] characters, so at most 2,000 bytes.
    start: u32,
    len: u16,
}

impl Shelf {
    fn push(&mut self, book: &Book) -> Result<(), CatalogError> {
        let too_large = || CatalogError::TooLarge;
        let start = u32::try_from(self.titles.len()).map_err(|_| too_large())?;
        let len = u16::try_from(book.title.len()).map_err(|_| too_large())?;
        start.checked_add(u32::from(len)).ok_or_else(too_large)?;
        self.titles.push_str(&book.title);
        self.entries.push(Entry {
            id: book.id,
            start,
            len,
        });
        Ok(())
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The book at `index`, which must be below [`Shelf::len`].
    pub(super) fn book(&self, index: usize) -> Book {
        let entry = self.entries[index];
        let start = entry.start as usize;
        Book {
            id: entry.id,
            title: self.titles[start..start + usize::from(entry.len)].to_owned(),
        }
    }
}

/// A catalog being filled, one checked book at a time.
#[derive(Debug, Default)]
pub(super) struct Builder {
    by_category: [Shelf; 3],
    ids: HashSet<i32>,
}

impl Builder {
    /// Checks `book` (id positive and unique; title non-empty, at most [`MAX_TITLE_CHARS`]
    /// characters, free of control characters) and shelves it.
    pub(super) fn add(&mut self, category: Category, book: &Book) -> Result<(), CatalogError> {
        if book.id <= 0 {
            return Err(CatalogError::BadId(book.id));
        }
        if !self.ids.insert(book.id) {
            return Err(CatalogError::DuplicateId(book.id));
        }
        let problem = if book.title.trim().is_empty() {
            Some("title must not be empty")
        } else if book.title.chars().count() > MAX_TITLE_CHARS {
            Some("title is longer than 500 characters")
        } else if book.title.chars().any(char::is_control) {
            Some("title must not contain control characters")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(CatalogError::BadTitle {
                id: book.id,
                problem,
            });
        }
        self.by_category[category.index()].push(book)
    }

    pub(super) fn finish(self) -> Result<Catalog, CatalogError> {
        if self.ids.is_empty() {
            return Err(CatalogError::Empty);
        }
        Ok(Catalog {
            by_category: self.by_category,
        })
    }
}
