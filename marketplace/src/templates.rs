//! The pages, as askama templates (HTML-escaped by default).

use askama::Template;

use crate::books::{Book, Category};

/// A link in the category navigation.
#[derive(Debug)]
pub struct NavLink {
    pub slug: &'static str,
    pub label: &'static str,
    pub current: bool,
}

impl NavLink {
    pub fn all(current: Option<Category>) -> Vec<NavLink> {
        Category::ALL
            .into_iter()
            .map(|c| NavLink {
                slug: c.slug(),
                label: c.label(),
                current: Some(c) == current,
            })
            .collect()
    }
}

/// The home page: recommendations in one category.
#[derive(Debug, Template)]
#[template(path = "page.html")]
pub struct RecommendationsPage {
    pub heading: String,
    pub label: &'static str,
    pub books: Vec<Book>,
    pub nav: Vec<NavLink>,
}

/// Any error, as a page.
#[derive(Debug, Template)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub heading: &'static str,
    pub message: String,
    pub nav: Vec<NavLink>,
}
