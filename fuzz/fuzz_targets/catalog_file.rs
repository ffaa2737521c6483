//! The recommendations catalog file parser: whatever an operator (or a bad volume) feeds it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recommendations::catalog::{Catalog, Category, MaxResults};

fuzz_target!(|data: &[u8]| {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    // A catalog that parses must also serve: sampling never panics or exceeds its bounds.
    if let Ok(catalog) = Catalog::parse(json) {
        let mut rng = rand::rng();
        for category in Category::ALL {
            let max = MaxResults::try_from(5).expect("in range");
            if let Ok(books) = catalog.recommend(category, max, &mut rng) {
                assert!(books.len() <= 5.min(catalog.len(category)));
            }
        }
    }
});
