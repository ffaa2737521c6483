//! The marketplace's own view of the domain: categories as people see them, books, and a
//! checked recommendation query. Templates and handlers use these, never protobuf types.

use serde::Serialize;

/// A book category, as shown on the site and written in URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Mystery,
    ScienceFiction,
    SelfHelp,
}

impl Category {
    /// Every category, in the order the site lists them.
    pub const ALL: [Category; 3] = [
        Category::Mystery,
        Category::ScienceFiction,
        Category::SelfHelp,
    ];

    /// The name used in URLs: `mystery`, `science_fiction`, `self_help`.
    pub fn slug(self) -> &'static str {
        match self {
            Category::Mystery => "mystery",
            Category::ScienceFiction => "science_fiction",
            Category::SelfHelp => "self_help",
        }
    }

    /// The name shown to people.
    pub fn label(self) -> &'static str {
        match self {
            Category::Mystery => "Mystery",
            Category::ScienceFiction => "Science fiction",
            Category::SelfHelp => "Self-help",
        }
    }

    /// Reads a category from a URL: the slug, case-insensitive, with `-` or `_`.
    pub fn from_slug(s: &str) -> Option<Self> {
        let wanted = s.trim().to_ascii_lowercase().replace('-', "_");
        Category::ALL.into_iter().find(|c| c.slug() == wanted)
    }
}

/// A recommended book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Book {
    pub id: i32,
    pub title: String,
}

/// The most books one page or API call may ask for.
pub const MAX_RESULTS_LIMIT: i32 = 100;

/// A recommendation request whose every value has been checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecommendationQuery {
    pub user_id: i32,
    pub category: Category,
    pub max_results: i32,
}

impl Default for RecommendationQuery {
    /// The original's home page: three mystery books for user 1.
    fn default() -> Self {
        RecommendationQuery {
            user_id: 1,
            category: Category::Mystery,
            max_results: 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_round_trip_and_are_lenient_about_case_and_dashes() {
        for c in Category::ALL {
            assert_eq!(Category::from_slug(c.slug()), Some(c));
        }
        assert_eq!(
            Category::from_slug("Science-Fiction"),
            Some(Category::ScienceFiction)
        );
        assert_eq!(Category::from_slug("SELF_HELP"), Some(Category::SelfHelp));
        assert_eq!(Category::from_slug("romance"), None);
        assert_eq!(Category::from_slug(""), None);
    }
}
