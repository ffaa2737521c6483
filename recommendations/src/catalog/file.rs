//! The catalog file: its JSON format, and loading it with every check (a regular file, within
//! the size cap, valid UTF-8 and JSON, every book valid), each refusal naming the file.

use std::{fmt, path::Path};

use serde::Deserialize;

use super::{Book, Catalog, CatalogError, Category, MAX_TITLE_CHARS, shelf::Builder};

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

/// No JSON string in a catalog file may be longer than this many bytes as written: a title of
/// 500 characters, each escaped as a surrogate pair (`\ud83d\udcda`), is 6,000.
pub const MAX_STRING_BYTES: usize = 8 * 1024;

/// A catalog file's bytes as the JSON parser reads them, with every string bounded: the parser holds a whole string before its
/// title can be checked, so a single string as long as the file would cost as much memory.
struct Guarded<R> {
    inner: R,
    in_string: bool,
    escaped: bool,
    string_bytes: usize,
}

impl<R: std::io::Read> std::io::Read for Guarded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &byte in &buf[..n] {
            if !self.in_string {
                if byte == b'"' {
                    (self.in_string, self.string_bytes) = (true, 0);
                }
                continue;
            }
            self.string_bytes += 1;
            if self.string_bytes > MAX_STRING_BYTES {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "a string longer than {MAX_STRING_BYTES} bytes (titles are at most \
                         {MAX_TITLE_CHARS} characters)"
                    ),
                ));
            }
            match (self.escaped, byte) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
        }
        Ok(n)
    }
}

impl Catalog {
    /// Loads and validates a catalog file (see [`CatalogFile`] for the format) of at most
    /// `max_bytes`. Only a regular file is read (a FIFO would block start-up, a device such as
    /// `/dev/zero` would never end); a UTF-8 byte order mark is skipped. The file is parsed as
    /// it is read, never held whole, and each book is shelved as it is parsed: the memory it
    /// takes is the catalog's own, and a string too long for a title is refused as soon as it
    /// is.
    pub fn load(path: &Path, max_bytes: u64) -> Result<Self, LoadError> {
        use std::io::{BufRead, Read};
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
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut reader =
            std::io::BufReader::with_capacity(64 * 1024, file.take(max_bytes.saturating_add(1)));
        // A byte order mark, then whitespace, then what the top level is.
        let head = reader.fill_buf().map_err(read_error)?;
        if head.starts_with(b"\xef\xbb\xbf") {
            reader.consume(3);
        }
        let first = loop {
            let head = reader.fill_buf().map_err(read_error)?;
            match head.iter().position(|b| !b.is_ascii_whitespace()) {
                Some(at) => {
                    let first = head[at];
                    reader.consume(at);
                    break Some(first);
                }
                None if head.is_empty() => break None,
                None => {
                    let all = head.len();
                    reader.consume(all);
                }
            }
        };
        if first != Some(b'{') {
            return Err(LoadError::Shape { path: shown });
        }
        let mut guarded = Guarded {
            inner: reader,
            in_string: false,
            escaped: false,
            string_bytes: 0,
        };
        let parsed = serde_json::from_reader::<_, CatalogFile>(&mut guarded);
        // The file grew after it was measured: the parser read it to the cap and one byte more
        // (it reads to the end, to refuse anything after the object).
        if guarded.inner.get_ref().limit() == 0 {
            return Err(too_large(max_bytes.saturating_add(1)));
        }
        let file = parsed.map_err(|cause| LoadError::Parse {
            path: shown.clone(),
            cause,
        })?;
        file.books
            .0
            .map_err(|cause| LoadError::Invalid { path: shown, cause })
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
    use super::*;

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

    /// Issue 21: a catalog just under the 256 MiB cap took RSS to 269 MiB before it was refused:
    /// the whole file was read, then parsed. A string longer than any title is refused as soon
    /// as it is read, here after 8 KiB of a 4 MiB title.
    #[test]
    fn a_string_longer_than_any_title_is_refused_as_it_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let giant = "x".repeat(4 << 20);
        let json = format!(r#"{{"books":[{{"id":1,"category":"MYSTERY","title":"{giant}"}}]}}"#);
        let path = write(&dir, "giant.json", json.as_bytes());
        let err = Catalog::load(&path, 1 << 30).expect_err("a 4 MiB title");
        assert!(
            err.to_string().contains("a string longer than 8192 bytes"),
            "{err}"
        );
        // Escapes count as written, and end no string early.
        let escaped =
            r#"{"books":[{"id":1,"category":"MYSTERY","title":"a \"quoted\" \\ title"}]}"#;
        let path = write(&dir, "escaped.json", escaped.as_bytes());
        let catalog = Catalog::load(&path, 1 << 20).expect("escapes are fine");
        assert_eq!(catalog.len(Category::Mystery), 1);
    }

    #[test]
    fn a_byte_order_mark_is_skipped_and_the_top_level_is_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let with_bom = [b"\xef\xbb\xbf".as_slice(), ONE_BOOK.as_bytes()].concat();
        let path = write(&dir, "bom.json", &with_bom);
        let catalog = Catalog::load(&path, 1 << 20).expect("a BOM is fine");
        assert_eq!(catalog.len(Category::Mystery), 1);
        let path = write(&dir, "list.json", b"[1, 2]");
        let err = Catalog::load(&path, 1 << 20).expect_err("a list");
        assert!(
            err.to_string().contains("top level must be a JSON object"),
            "{err}"
        );
    }
}
