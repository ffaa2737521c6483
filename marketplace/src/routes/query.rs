//! Reading the query string of `/` and `/api/recommendations` into a checked query.
//!
//! By hand over `form_urlencoded` rather than axum's `Query` extractor: serde's messages name
//! neither the parameter nor the accepted values in words a reader of the page can act on, and
//! a repeated parameter would be silently one of its values.

use crate::books::{Category, MAX_RESULTS_LIMIT, RecommendationQuery};

/// Parses `category`, `max_results` and `user_id`; each is optional and defaults to the
/// original's page (mystery, 3, user 1). Unknown parameters are ignored (links carry tracking
/// tags); a parameter given twice is an error rather than a guess at which one was meant.
pub fn parse(raw: Option<&str>) -> Result<RecommendationQuery, String> {
    let mut query = RecommendationQuery::default();
    let mut seen: Vec<String> = Vec::new();
    for (key, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        let known = matches!(key.as_ref(), "category" | "max_results" | "user_id");
        if !known {
            continue;
        }
        if seen.iter().any(|k| *k == key) {
            return Err(format!("query parameter {key} is given more than once"));
        }
        seen.push(key.to_string());
        match key.as_ref() {
            "category" => {
                query.category = Category::from_slug(&value).ok_or_else(|| {
                    format!(
                        "unknown category {}; expected one of {}",
                        quoted(&value),
                        Category::ALL.map(Category::slug).join(", ")
                    )
                })?;
            }
            "max_results" => {
                query.max_results = parse_int(&value, "max_results", 0, MAX_RESULTS_LIMIT)?;
            }
            _ => query.user_id = parse_int(&value, "user_id", 0, i32::MAX)?,
        }
    }
    Ok(query)
}

fn parse_int(value: &str, name: &str, min: i32, max: i32) -> Result<i32, String> {
    value
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|v| (i64::from(min)..=i64::from(max)).contains(v))
        .and_then(|v| i32::try_from(v).ok())
        .ok_or_else(|| {
            format!(
                "{name} must be a whole number from {min} to {max}, got {}",
                quoted(value)
            )
        })
}

/// A bad value as echoed in an error: quoted, control characters escaped, and cut to at most
/// 40 characters *after* escaping (each control character escapes to several), so an error
/// stays short and readable whatever the input. Found by fuzzing: cutting first let 40 control
/// characters grow to some 240.
fn quoted(value: &str) -> String {
    const MAX_CHARS: usize = 40;
    let mut escaped = value.escape_debug();
    let shown: String = escaped.by_ref().take(MAX_CHARS).collect();
    let more = if escaped.next().is_some() { "…" } else { "" };
    format!("\"{shown}{more}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_query_is_the_originals_page() {
        assert_eq!(parse(None), Ok(RecommendationQuery::default()));
        assert_eq!(parse(Some("")), Ok(RecommendationQuery::default()));
    }

    #[test]
    fn every_field_is_read() {
        let q = parse(Some(
            "category=self_help&max_results=7&user_id=42&utm_source=x",
        ))
        .expect("valid");
        assert_eq!(
            q,
            RecommendationQuery {
                user_id: 42,
                category: Category::SelfHelp,
                max_results: 7
            }
        );
    }

    #[test]
    fn bad_values_are_explained() {
        let cases = [
            (
                "category=romance",
                "unknown category \"romance\"; expected one of mystery, science_fiction, self_help",
            ),
            (
                "max_results=-1",
                "max_results must be a whole number from 0 to 100, got \"-1\"",
            ),
            (
                "max_results=101",
                "max_results must be a whole number from 0 to 100, got \"101\"",
            ),
            (
                "max_results=3.5",
                "max_results must be a whole number from 0 to 100, got \"3.5\"",
            ),
            (
                "max_results=",
                "max_results must be a whole number from 0 to 100, got \"\"",
            ),
            (
                "user_id=abc",
                "user_id must be a whole number from 0 to 2147483647, got \"abc\"",
            ),
            (
                "user_id=99999999999999999999",
                "user_id must be a whole number",
            ),
            (
                "category=mystery&category=self_help",
                "query parameter category is given more than once",
            ),
        ];
        for (raw, want) in cases {
            let err = parse(Some(raw)).expect_err(raw);
            assert!(err.starts_with(want), "{raw}: {err}");
        }
    }

    use proptest::strategy::Strategy;

    proptest::proptest! {
        /// Any query string: either a query within every bound, or a short message. No panic.
        #[test]
        fn any_query_string_is_a_valid_query_or_a_short_error(
            key in proptest::sample::select(vec!["category", "max_results", "user_id", "other", ""]),
            value in proptest::collection::vec(proptest::char::any(), 0..120)
                .prop_map(|chars| chars.into_iter().collect::<String>()),
            tail in proptest::collection::vec(proptest::char::any(), 0..40)
                .prop_map(|chars| chars.into_iter().collect::<String>()),
        ) {
            let raw = format!("{key}={value}&{tail}");
            match parse(Some(&raw)) {
                Ok(q) => {
                    proptest::prop_assert!((0..=MAX_RESULTS_LIMIT).contains(&q.max_results));
                    proptest::prop_assert!(q.user_id >= 0);
                }
                Err(message) => proptest::prop_assert!(message.chars().count() < 200),
            }
        }

        #[test]
        fn well_formed_values_always_parse(
            category in proptest::sample::select(vec!["mystery", "science_fiction", "self_help", "SELF-HELP"]),
            max_results in 0i32..=100,
            user_id in 0i32..=i32::MAX,
        ) {
            let q = parse(Some(&format!("category={category}&max_results={max_results}&user_id={user_id}")))
                .expect("valid");
            proptest::prop_assert_eq!((q.max_results, q.user_id), (max_results, user_id));
        }
    }

    /// The input the fuzzer found: control characters that grow when escaped.
    #[test]
    fn escaped_control_characters_still_make_a_short_error() {
        let raw = format!("category={}my\0\0\0.\0steWid=1", "\u{e}".repeat(25));
        let err = parse(Some(&raw)).expect_err("bad category");
        assert!(err.chars().count() < 200, "{err}");
        assert!(err.starts_with("unknown category \"\\u{e}"), "{err}");
    }

    #[test]
    fn long_bad_values_are_cut_short() {
        let long = "x".repeat(5000);
        let err = parse(Some(&format!("category={long}"))).expect_err("bad");
        assert!(err.len() < 200, "{err}");
    }
}
