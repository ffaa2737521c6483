//! The domain: categories, books, the catalog and how recommendations are drawn from it.
//! Nothing here knows about gRPC or protobuf. How a category's books are stored is in `shelf`,
//! the catalog file's format and loading in `file`.

mod file;
mod shelf;

use std::fmt;

use rand::Rng;
use serde::Deserialize;

pub use file::{LoadError, ParseError};
use shelf::{Builder, Shelf};

/// A book category. The variants are the ones the wire contract knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Category {
    Mystery,
    ScienceFiction,
    SelfHelp,
}

impl Category {
    /// Every category, in wire order.
    pub const ALL: [Category; 3] = [
        Category::Mystery,
        Category::ScienceFiction,
        Category::SelfHelp,
    ];

    fn index(self) -> usize {
        match self {
            Category::Mystery => 0,
            Category::ScienceFiction => 1,
            Category::SelfHelp => 2,
        }
    }
}

/// A book that can be recommended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Book {
    pub id: i32,
    pub title: String,
}

/// The most recommendations one request may ask for. Replies stay small whatever the catalog size.
pub const MAX_RESULTS_LIMIT: usize = 1000;

/// The longest title the catalog accepts, in characters.
pub const MAX_TITLE_CHARS: usize = 500;

/// Why a catalog is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("the catalog has no books")]
    Empty,
    #[error("book id {0} must be positive")]
    BadId(i32),
    #[error("book id {0} appears more than once")]
    DuplicateId(i32),
    #[error("book id {id}: {problem}")]
    BadTitle { id: i32, problem: &'static str },
    #[error("the titles of one category add up to more than 4 GiB")]
    TooLarge,
}

/// The books, grouped by category so a request touches only its own category.
#[derive(Debug, Clone)]
pub struct Catalog {
    by_category: [Shelf; 3],
}

impl Catalog {
    /// The original tutorial's nine books.
    pub fn builtin() -> Self {
        let books = [
            (1, Category::Mystery, "The Maltese Falcon"),
            (2, Category::Mystery, "Murder on the Orient Express"),
            (3, Category::Mystery, "The Hound of the Baskervilles"),
            (
                4,
                Category::ScienceFiction,
                "The Hitchhiker's Guide To The Galaxy",
            ),
            (5, Category::ScienceFiction, "Ender's Game"),
            (6, Category::ScienceFiction, "The Dune Chronicles"),
            (
                7,
                Category::SelfHelp,
                "The 7 Habits of Highly Effective People",
            ),
            (
                8,
                Category::SelfHelp,
                "How to Win Friends and Influence People",
            ),
            (9, Category::SelfHelp, "Man's Search for Meaning"),
        ];
        let entries = books.map(|(id, category, title)| {
            (
                category,
                Book {
                    id,
                    title: title.to_owned(),
                },
            )
        });
        match Catalog::new(entries) {
            Ok(catalog) => catalog,
            // The table above is fixed and valid; the unit tests load it.
            Err(e) => unreachable!("built-in catalog is invalid: {e}"),
        }
    }

    /// Builds a catalog, checking every book: ids positive and unique, titles non-empty, at most
    /// [`MAX_TITLE_CHARS`] characters and free of control characters.
    pub fn new(books: impl IntoIterator<Item = (Category, Book)>) -> Result<Self, CatalogError> {
        let mut builder = Builder::default();
        for (category, book) in books {
            builder.add(category, &book)?;
        }
        builder.finish()
    }

    /// How many books there are in `category`.
    pub fn len(&self, category: Category) -> usize {
        self.by_category[category.index()].len()
    }

    /// Up to `max_results` distinct books of `category`, a uniform random sample in random
    /// order. The cost is O(`max_results`), not O(books in the category).
    pub fn recommend(
        &self,
        category: Category,
        max_results: MaxResults,
        rng: &mut impl Rng,
    ) -> Result<Vec<Book>, CategoryNotFound> {
        let books = &self.by_category[category.index()];
        if books.is_empty() {
            return Err(CategoryNotFound);
        }
        let k = max_results.get().min(books.len());
        Ok(rand::seq::index::sample(rng, books.len(), k)
            .into_iter()
            .map(|i| books.book(i))
            .collect())
    }
}

/// The category has no books.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CategoryNotFound;

/// A validated `max_results`: between 0 and [`MAX_RESULTS_LIMIT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxResults(usize);

impl MaxResults {
    pub fn get(self) -> usize {
        self.0
    }
}

impl TryFrom<i32> for MaxResults {
    type Error = OutOfRange;

    fn try_from(value: i32) -> Result<Self, Self::Error> {
        usize::try_from(value)
            .ok()
            .filter(|v| *v <= MAX_RESULTS_LIMIT)
            .map(MaxResults)
            .ok_or(OutOfRange(value))
    }
}

/// A `max_results` outside 0..=[`MAX_RESULTS_LIMIT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfRange(pub i32);

impl fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "must be between 0 and {MAX_RESULTS_LIMIT}, got {}",
            self.0
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn max(n: i32) -> MaxResults {
        MaxResults::try_from(n).expect("in range")
    }

    #[test]
    fn the_builtin_catalog_has_the_originals_nine_books() {
        let c = Catalog::builtin();
        for category in Category::ALL {
            assert_eq!(c.len(category), 3);
        }
        let mut rng = StdRng::seed_from_u64(1);
        let mut mystery: Vec<_> = c
            .recommend(Category::Mystery, max(10), &mut rng)
            .expect("books")
            .into_iter()
            .map(|b| (b.id, b.title))
            .collect();
        mystery.sort();
        assert_eq!(
            mystery,
            vec![
                (1, "The Maltese Falcon".to_owned()),
                (2, "Murder on the Orient Express".to_owned()),
                (3, "The Hound of the Baskervilles".to_owned()),
            ]
        );
    }

    #[test]
    fn a_sample_is_min_of_max_results_and_books_distinct_and_in_category() {
        let c = Catalog::builtin();
        let mut rng = StdRng::seed_from_u64(7);
        for n in 0..6 {
            let books = c
                .recommend(Category::SelfHelp, max(n), &mut rng)
                .expect("books");
            assert_eq!(books.len(), (n as usize).min(3));
            let ids: HashSet<_> = books.iter().map(|b| b.id).collect();
            assert_eq!(ids.len(), books.len(), "a book repeated");
            assert!(ids.iter().all(|id| (7..=9).contains(id)));
        }
    }

    #[test]
    fn samples_vary_in_choice_and_order() {
        let c = Catalog::builtin();
        let mut rng = StdRng::seed_from_u64(42);
        let seen: HashSet<Vec<i32>> = (0..200)
            .map(|_| {
                c.recommend(Category::Mystery, max(2), &mut rng)
                    .expect("books")
                    .iter()
                    .map(|b| b.id)
                    .collect()
            })
            .collect();
        // 3 books taken 2 at a time in order: 6 permutations, all should turn up in 200 draws.
        assert_eq!(seen.len(), 6, "{seen:?}");
    }

    #[test]
    fn a_category_without_books_is_not_found() {
        let c = Catalog::new([(
            Category::Mystery,
            Book {
                id: 1,
                title: "Only one".into(),
            },
        )])
        .expect("valid");
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(
            c.recommend(Category::SelfHelp, max(1), &mut rng),
            Err(CategoryNotFound)
        );
    }

    #[test]
    fn max_results_outside_its_range_is_refused() {
        assert_eq!(MaxResults::try_from(-1), Err(OutOfRange(-1)));
        assert_eq!(MaxResults::try_from(i32::MIN), Err(OutOfRange(i32::MIN)));
        assert_eq!(MaxResults::try_from(1001), Err(OutOfRange(1001)));
        assert_eq!(MaxResults::try_from(1000).map(MaxResults::get), Ok(1000));
        assert_eq!(MaxResults::try_from(0).map(MaxResults::get), Ok(0));
        assert_eq!(
            OutOfRange(-1).to_string(),
            "must be between 0 and 1000, got -1"
        );
    }

    proptest::proptest! {
        /// Whatever the catalog and request: never more than asked, never more than there are,
        /// never a repeat, never a book of another category, and each book with its own title.
        #[test]
        fn samples_respect_every_bound(
            books in proptest::collection::vec((0usize..3, "[a-zé漢 ]{0,20}"), 1..60),
            category in 0usize..3,
            max_results in 0i32..=1000,
            seed: u64,
        ) {
            let books: Vec<(Category, Book)> = books
                .into_iter()
                .zip(1..)
                .map(|((c, title), id)| (Category::ALL[c], Book { id, title: format!("t{title}") }))
                .collect();
            let catalog = Catalog::new(books.clone()).expect("valid");
            let category = Category::ALL[category];
            let in_category: HashMap<i32, String> = books
                .into_iter()
                .filter(|(c, _)| *c == category)
                .map(|(_, book)| (book.id, book.title))
                .collect();
            let mut rng = StdRng::seed_from_u64(seed);
            match catalog.recommend(category, max(max_results), &mut rng) {
                Err(CategoryNotFound) => proptest::prop_assert!(in_category.is_empty()),
                Ok(sample) => {
                    let want = (max_results as usize).min(in_category.len());
                    proptest::prop_assert_eq!(sample.len(), want);
                    let ids: HashSet<i32> = sample.iter().map(|b| b.id).collect();
                    proptest::prop_assert_eq!(ids.len(), sample.len());
                    for book in &sample {
                        proptest::prop_assert_eq!(in_category.get(&book.id), Some(&book.title));
                    }
                }
            }
        }
    }
}
