//! Fuzzing the envelope decoders: whatever bytes arrive on a queue, decoding returns a value or
//! an error and never panics or overflows the stack.
//!
//! CI runs 10,000 cases of each property. For a million:
//! `FLEET_FUZZ_CASES=1000000 cargo test --release -p fleet-shared --test fuzz_envelope`

use fleet_shared::envelope::{self, DecodeError, ResultMessage};
use proptest::prelude::*;
use serde_json::{Value, json};

fn cases() -> u32 {
    std::env::var("FLEET_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000)
}

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid task, result or manifest with one field replaced by anything, or removed.
fn near_envelope() -> impl Strategy<Value = Vec<u8>> {
    let task = json!({"v":1,"id":"t","kind":"square","batch":null,"payload":{"n":3},
        "created_at":"2026-11-27T12:00:00Z","deadline":null});
    let result = json!({"v":1,"task_id":"t","batch":"b","kind":"square","status":"ok",
        "output":{"n":3,"square":9},"error":null,"attempts":1,"worker":"h/1/0",
        "started_at":"2026-11-27T12:00:00Z","finished_at":"2026-11-27T12:00:01Z"});
    let manifest = json!({"v":1,"type":"batch","batch":"b","total":2,"kind":"square"});
    let group = json!({"v":1,"type":"results","results":[result.clone(), result.clone()]});
    (
        prop_oneof![Just(task), Just(result), Just(manifest), Just(group)],
        any::<prop::sample::Index>(),
        any_json(),
        any::<bool>(),
    )
        .prop_map(|(mut base, field, value, remove)| {
            if let Some(object) = base.as_object_mut() {
                let key = object.keys().nth(field.index(object.len())).cloned();
                if let Some(key) = key {
                    if remove {
                        object.remove(&key);
                    } else {
                        object.insert(key, value);
                    }
                }
            }
            serde_json::to_vec(&base).unwrap_or_default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = envelope::decode_task(&body);
        let _ = envelope::decode_result(&body);
    }

    #[test]
    fn arbitrary_json_never_panics(value in any_json()) {
        let body = serde_json::to_vec(&value).unwrap_or_default();
        let _ = envelope::decode_task(&body);
        let _ = envelope::decode_result(&body);
    }

    #[test]
    fn near_misses_decode_or_say_why(body in near_envelope()) {
        match envelope::decode_task(&body) {
            Ok(task) => prop_assert!(!task.id.is_empty() && !task.kind.is_empty()),
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
        match envelope::decode_result(&body) {
            Ok(ResultMessage::Result(r)) => prop_assert_eq!(r.v, envelope::VERSION),
            Ok(ResultMessage::Manifest(m)) => prop_assert_eq!(m.v, envelope::VERSION),
            Ok(ResultMessage::Results(group)) => prop_assert!(
                !group.is_empty() && group.iter().all(|r| r.v == envelope::VERSION)
            ),
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }
}

fn task_with_payload(payload: &str) -> String {
    format!(
        r#"{{"v":1,"id":"t","kind":"square","batch":null,"payload":{payload},"created_at":"2026-11-27T12:00:00Z","deadline":null}}"#
    )
}

#[test]
fn nesting_deeper_than_128_is_refused_not_a_stack_overflow() {
    for depth in [129, 10_000, 1_000_000] {
        let body = task_with_payload(&format!("{}{}", "[".repeat(depth), "]".repeat(depth)));
        let error = envelope::decode_task(body.as_bytes()).expect_err("too deep");
        assert!(matches!(error, DecodeError::Malformed(_)), "{error:?}");
        assert!(error.to_string().contains("recursion limit"), "{error}");
    }
    let body = task_with_payload(&format!("{}{}", "[".repeat(100), "]".repeat(100)));
    envelope::decode_task(body.as_bytes()).expect("100 levels decode");
}
