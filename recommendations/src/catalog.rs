//! The domain: categories, books, the catalog and how recommendations are drawn from it.
//! Nothing here knows about gRPC or protobuf.

use std::{collections::HashSet, fmt, path::Path};

use rand::Rng;
use serde::Deserialize;

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

/// The books of one category, packed: a 12-byte entry per book and every title in one buffer,
/// so drawing a book reads one entry and one run of the buffer. A `Vec<Book>` held an allocation
/// per title besides: 1,000,000 books took 83 MiB that way, 46 MiB packed
/// (docs/performance.md).
#[derive(Debug, Clone, Default)]
struct Shelf {
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

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The book at `index`, which must be below [`Shelf::len`].
    fn book(&self, index: usize) -> Book {
        let entry = self.entries[index];
        let start = entry.start as usize;
        Book {
            id: entry.id,
            title: self.titles[start..start + usize::from(entry.len)].to_owned(),
        }
    }
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

/// A catalog being filled, one checked book at a time.
#[derive(Debug, Default)]
struct Builder {
    by_category: [Shelf; 3],
    ids: HashSet<i32>,
}

impl Builder {
    /// Checks `book` (id positive and unique; title non-empty, at most [`MAX_TITLE_CHARS`]
    /// characters, free of control characters) and shelves it.
    fn add(&mut self, category: Category, book: &Book) -> Result<(), CatalogError> {
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

    fn finish(self) -> Result<Catalog, CatalogError> {
        if self.ids.is_empty() {
            return Err(CatalogError::Empty);
        }
        Ok(Catalog {
            by_category: self.by_category,
        })
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

/// The catalog file format (JSON):
///
/// ```json
/// { "books": [ { "id": 1, "category": "MYSTERY", "title": "The Maltese Falcon" } ] }
/// ```
///
/// `category` is one of `MYSTERY`, `SCIENCE_FICTION`, `SELF_HELP`; unknown fields are refused so
/// a typo is not silently ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    books: Books,
}

/// The `books` list, checked and shelved as it is read: a large file is never held as one
/// string per book beside the catalog being built from it. The first invalid book is the
/// error; the books after it are still parsed (and dropped), so that a file which is not even
/// valid JSON is reported as such, as a whole-file parse would.
#[derive(Debug)]
struct Books(Result<Catalog, CatalogError>);

impl<'de> Deserialize<'de> for Books {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Shelve;

        impl<'de> serde::de::Visitor<'de> for Shelve {
            type Value = Books;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of books")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Books, A::Error> {
                let mut builder = Builder::default();
                while let Some(b) = seq.next_element::<BookEntry>()? {
                    let book = Book {
                        id: b.id,
                        title: b.title,
                    };
                    if let Err(invalid) = builder.add(b.category, &book) {
                        while seq.next_element::<BookEntry>()?.is_some() {}
                        return Ok(Books(Err(invalid)));
                    }
                }
                Ok(Books(builder.finish()))
            }
        }

        deserializer.deserialize_seq(Shelve)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BookEntry {
    id: i32,
    category: Category,
    title: String,
}

/// A catalog file that cannot be used; the message names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("catalog file {path}: cannot read: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("catalog file {path}: invalid JSON: {cause}")]
    Parse {
        path: String,
        cause: serde_json::Error,
    },
    #[error("catalog file {path}: {cause}")]
    Invalid { path: String, cause: CatalogError },
    #[error("catalog file {path}: not a regular file but {kind}")]
    NotRegular { path: String, kind: &'static str },
    #[error("catalog file {path}: {size} bytes, over the limit of {max} (CATALOG_MAX_BYTES)")]
    TooLarge { path: String, size: u64, max: u64 },
    #[error("catalog file {path}: the top level must be a JSON object with a \"books\" list")]
    Shape { path: String },
}

/// What kind of file this is, when it is not a regular file.
fn file_kind(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_char_device() || file_type.is_block_device() {
        "a device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

impl Catalog {
    /// Loads and validates a catalog file (see [`CatalogFile`] for the format) of at most
    /// `max_bytes`. Only a regular file is read (a FIFO would block start-up, a device such as
    /// `/dev/zero` would never end); a UTF-8 byte order mark is skipped.
    pub fn load(path: &Path, max_bytes: u64) -> Result<Self, LoadError> {
        use std::io::Read;
        let shown = path.display().to_string();
        let read_error = |cause| LoadError::Read {
            path: shown.clone(),
            cause,
        };
        let metadata = std::fs::metadata(path).map_err(read_error)?;
        if !metadata.is_file() {
            return Err(LoadError::NotRegular {
                path: shown,
                kind: file_kind(metadata.file_type()),
            });
        }
        let too_large = |size| LoadError::TooLarge {
            path: shown.clone(),
            size,
            max: max_bytes,
        };
        if metadata.len() > max_bytes {
            return Err(too_large(metadata.len()));
        }
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|file| {
                file.take(max_bytes.saturating_add(1))
                    .read_to_end(&mut bytes)
            })
            .map_err(read_error)?;
        // The file grew after it was measured.
        if bytes.len() as u64 > max_bytes {
            return Err(too_large(bytes.len() as u64));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            read_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.utf8_error(),
            ))
        })?;
        let json = text.strip_prefix('\u{feff}').unwrap_or(&text);
        if !json.trim_start().starts_with('{') {
            return Err(LoadError::Shape { path: shown });
        }
        Catalog::parse(json).map_err(|e| match e {
            ParseError::Json(cause) => LoadError::Parse { path: shown, cause },
            ParseError::Invalid(cause) => LoadError::Invalid { path: shown, cause },
        })
    }

    /// Parses and validates catalog JSON.
    pub fn parse(json: &str) -> Result<Self, ParseError> {
        let file: CatalogFile = serde_json::from_str(json).map_err(ParseError::Json)?;
        file.books.0.map_err(ParseError::Invalid)
    }
}

/// Why catalog JSON was refused.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("invalid JSON: {0}")]
    Json(serde_json::Error),
    #[error(transparent)]
    Invalid(CatalogError),
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

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

    #[test]
    fn catalog_json_parses() {
        let c = Catalog::parse(
            r#"{"books":[{"id":10,"category":"SCIENCE_FICTION","title":"Solaris"}]}"#,
        )
        .expect("valid");
        assert_eq!(c.len(Category::ScienceFiction), 1);
        assert_eq!(c.len(Category::Mystery), 0);
    }

    #[test]
    fn bad_catalogs_are_refused_with_the_reason() {
        let cases = [
            (r#"{"books":[]}"#, "the catalog has no books"),
            (
                r#"{"books":[{"id":0,"category":"MYSTERY","title":"A"}]}"#,
                "book id 0 must be positive",
            ),
            (
                r#"{"books":[{"id":1,"category":"MYSTERY","title":"A"},{"id":1,"category":"SELF_HELP","title":"B"}]}"#,
                "book id 1 appears more than once",
            ),
            (
                r#"{"books":[{"id":1,"category":"MYSTERY","title":"  "}]}"#,
                "book id 1: title must not be empty",
            ),
            (
                r#"{"books":[{"id":1,"category":"MYSTERY","title":"a\u0000b"}]}"#,
                "book id 1: title must not contain control characters",
            ),
            (
                r#"{"books":[{"id":1,"category":"ROMANCE","title":"A"}]}"#,
                "unknown variant `ROMANCE`",
            ),
            (
                r#"{"books":[{"id":1,"category":"MYSTERY","titel":"A"}]}"#,
                "unknown field `titel`",
            ),
            (r#"{"books":"#, "EOF while parsing"),
            (r#"{"bücher":[]}"#, "unknown field `bücher`"),
            (r#"{}"#, "missing field `books`"),
            (r#"{"books":{}}"#, "expected a list of books"),
            // The first invalid book is the one named…
            (
                r#"{"books":[{"id":1,"category":"MYSTERY","title":""},{"id":-2,"category":"MYSTERY","title":"B"}]}"#,
                "book id 1: title must not be empty",
            ),
            // …but a file that is not valid JSON further on is reported as such.
            (
                r#"{"books":[{"id":0,"category":"MYSTERY","title":"A"},{"id":1,"category":"ROMANCE","title":"B"}]}"#,
                "unknown variant `ROMANCE`",
            ),
            (
                r#"{"books":[{"id":0,"category":"MYSTERY","title":"A"},"#,
                "EOF while parsing",
            ),
        ];
        for (json, want) in cases {
            let err = Catalog::parse(json).expect_err(json).to_string();
            assert!(err.contains(want), "{json}: got {err:?}, want {want:?}");
        }
        let long = "x".repeat(MAX_TITLE_CHARS + 1);
        let err = Catalog::parse(&format!(
            r#"{{"books":[{{"id":1,"category":"MYSTERY","title":"{long}"}}]}}"#
        ))
        .expect_err("too long");
        assert!(err.to_string().contains("longer than 500"));
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

        /// Any text at all is either a valid catalog or an error, never a panic.
        #[test]
        fn catalog_parsing_never_panics(json in "\\PC{0,200}") {
            let _ = Catalog::parse(&json);
        }
    }

    #[test]
    fn a_missing_file_is_named_in_the_error() {
        let err =
            Catalog::load(Path::new("/nonexistent/books.json"), 1 << 20).expect_err("missing");
        assert!(
            err.to_string()
                .starts_with("catalog file /nonexistent/books.json: cannot read"),
            "{err}"
        );
    }

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        path
    }

    const ONE_BOOK: &str = r#"{"books": [{"id": 1, "title": "T", "category": "MYSTERY"}]}"#;

    #[test]
    fn only_regular_files_within_the_size_cap_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Catalog::load(Path::new("/dev/zero"), 1 << 20).expect_err("device");
        assert!(
            err.to_string().contains("not a regular file but a device"),
            "{err}"
        );
        let err = Catalog::load(dir.path(), 1 << 20).expect_err("directory");
        assert!(err.to_string().contains("a directory"), "{err}");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        // Opening a FIFO for reading would block until a writer came; it must not be opened.
        let err = Catalog::load(&fifo, 1 << 20).expect_err("fifo");
        assert!(err.to_string().contains("a FIFO"), "{err}");
        let path = write(&dir, "books.json", ONE_BOOK.as_bytes());
        let err = Catalog::load(&path, 10).expect_err("too large");
        assert!(err.to_string().contains("over the limit of 10"), "{err}");
        Catalog::load(&path, ONE_BOOK.len() as u64).expect("exactly at the cap");
    }

    #[test]
    fn a_byte_order_mark_is_skipped_and_the_top_level_is_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let with_bom = [b"\xef\xbb\xbf".as_slice(), ONE_BOOK.as_bytes()].concat();
        let path = write(&dir, "bom.json", &with_bom);
        let catalog = Catalog::load(&path, 1 << 20).expect("a BOM is fine");
        assert!(
            catalog
                .recommend(Category::Mystery, max(1), &mut rand::rng())
                .is_ok()
        );
        let path = write(&dir, "list.json", b"[1, 2]");
        let err = Catalog::load(&path, 1 << 20).expect_err("a list");
        assert!(
            err.to_string().contains("top level must be a JSON object"),
            "{err}"
        );
    }
}
