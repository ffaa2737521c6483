//! Checking JSON log lines as a log pipeline reads them.

/// A JSON object whose top-level keys are all different (deserializing fails otherwise): most
/// JSON readers keep only the last of two equal keys, so a repeated key loses a field.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
                    }
                }
                Ok(UniqueKeys)
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

/// Checks one line of a service's `LOG_FORMAT=json` output: a JSON object, each key once, with a
/// `timestamp`, a `level` and a `message`. Panics naming the line otherwise; returns the object.
pub fn parse_line(line: &str) -> serde_json::Value {
    let event: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    serde_json::from_str::<UniqueKeys>(line)
        .unwrap_or_else(|e| panic!("a key twice ({e}): {line}"));
    for field in ["timestamp", "level", "message"] {
        assert!(event[field].is_string(), "no {field}: {line}");
    }
    event
}
