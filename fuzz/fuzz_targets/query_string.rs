//! The marketplace's query-string parser: any bytes a browser or attacker can put after `?`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use marketplace::{books::MAX_RESULTS_LIMIT, routes::query::parse};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    match parse(Some(raw)) {
        Ok(q) => {
            assert!((0..=MAX_RESULTS_LIMIT).contains(&q.max_results));
            assert!(q.user_id >= 0);
        }
        // Errors echo at most a short excerpt of the input.
        Err(message) => assert!(message.chars().count() < 200, "{message}"),
    }
});
