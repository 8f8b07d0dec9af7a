//! Fuzzing the envelope decoders: whatever bytes arrive on a queue, decoding returns a value or
//! an error and never panics or overflows the stack; names of any length from 0 bytes to past
//! 64 KiB decode within their bound (so they fit the AMQP short strings they become) or are
//! refused naming the field; headers of every AMQP value type read safely.
//!
//! CI runs 10,000 cases of each property. For a million:
//! `FLEET_FUZZ_CASES=1000000 cargo test --release -p fleet-shared --test fuzz_envelope`

use fleet_shared::envelope::{self, DecodeError, ResultMessage};
use fleet_shared::publisher::Outgoing;
use lapin::types::{AMQPValue, DecimalValue, FieldTable};
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

/// A name-like string from 0 bytes to past 64 KiB, the boundaries most often, of ASCII,
/// two-byte, control or any characters.
fn any_name() -> impl Strategy<Value = String> {
    let length = prop_oneof![
        prop::sample::select(vec![
            0usize, 1, 127, 128, 254, 255, 256, 65_535, 65_536, 70_000
        ]),
        0usize..70_000,
    ];
    let character = prop_oneof![
        Just('a'),
        Just('é'),
        Just('\u{1b}'),
        Just('\n'),
        any::<char>()
    ];
    (length, character).prop_map(|(bytes, c)| {
        let mut name = String::new();
        while name.len() + c.len_utf8() <= bytes {
            name.push(c);
        }
        name
    })
}

/// A task, result or manifest with one of its names set to `name`.
fn with_name() -> impl Strategy<Value = (Vec<u8>, &'static str)> {
    let fields: [(&'static str, &'static str); 8] = [
        ("task", "id"),
        ("task", "kind"),
        ("task", "batch"),
        ("result", "task_id"),
        ("result", "kind"),
        ("result", "batch"),
        ("manifest", "batch"),
        ("manifest", "kind"),
    ];
    (prop::sample::select(fields.to_vec()), any_name()).prop_map(|((message, field), name)| {
        let mut base = match message {
            "task" => json!({"v":1,"id":"t","kind":"square","batch":null,"payload":{},
                "created_at":"2026-11-27T12:00:00Z"}),
            "result" => json!({"v":1,"task_id":"t","batch":"b","kind":"square","status":"ok",
                "output":{},"error":null,"attempts":1,"worker":"h/1/0",
                "started_at":"2026-11-27T12:00:00Z","finished_at":"2026-11-27T12:00:01Z"}),
            _ => json!({"v":1,"type":"batch","batch":"b","total":2,"kind":"square"}),
        };
        base[field] = Value::String(name);
        (serde_json::to_vec(&base).unwrap_or_default(), field)
    })
}

/// Any AMQP field value, of every type, nested a little.
fn any_amqp_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        ".{0,64}".prop_map(|s| AMQPValue::ShortString(s.as_str().into())),
        prop::collection::vec(any::<u8>(), 0..128).prop_map(|b| AMQPValue::LongString(b.into())),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| AMQPValue::ByteArray(b.into())),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| AMQPValue::FieldArray(v.into())),
            prop::collection::btree_map("[a-z-]{1,12}", inner, 0..4).prop_map(|m| {
                let mut table = FieldTable::default();
                for (k, v) in m {
                    table.insert(k.as_str().into(), v);
                }
                AMQPValue::FieldTable(table)
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Names up to 70 KB: fewer cases than the properties above.
        cases: cases() / 5,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Past the decoder, a name always fits where it goes: an AMQP short string.
    #[test]
    fn names_of_any_length_decode_within_their_bound_or_are_refused_by_name(
        (body, field) in with_name()
    ) {
        let task = envelope::decode_task(&body);
        let result = envelope::decode_result(&body);
        for refused in [task.as_ref().err(), result.as_ref().err()].into_iter().flatten() {
            if let DecodeError::Field(e) = refused {
                prop_assert_eq!(e.field, field);
            }
        }
        if let Ok(task) = &task {
            prop_assert!(task.check().is_ok());
            let _ = Outgoing::task(task);
        }
        match &result {
            Ok(ResultMessage::Result(r)) => {
                prop_assert!(r.check().is_ok());
                let _ = Outgoing::result(r);
            }
            Ok(ResultMessage::Manifest(m)) => {
                prop_assert!(m.check().is_ok());
                let _ = Outgoing::manifest(m);
            }
            Ok(ResultMessage::Results(_)) | Err(_) => {}
        }
    }

    /// Every header fleet reads, with a value of every AMQP type: a number or nothing, never a
    /// panic, and never a fresh set of attempts from a count past `u32::MAX`.
    #[test]
    fn headers_of_every_amqp_type_read_safely(attempt in any_amqp_value(), trace in any_amqp_value()) {
        let expected: i128 = match &attempt {
            AMQPValue::LongLongInt(n) => (*n).into(),
            AMQPValue::LongInt(n) => (*n).into(),
            AMQPValue::ShortInt(n) => (*n).into(),
            AMQPValue::ShortShortInt(n) => (*n).into(),
            AMQPValue::LongUInt(n) => (*n).into(),
            AMQPValue::ShortUInt(n) => (*n).into(),
            AMQPValue::ShortShortUInt(n) => (*n).into(),
            _ => 0,
        };
        let mut headers = FieldTable::default();
        headers.insert(envelope::HEADER_ATTEMPT.into(), attempt);
        headers.insert(envelope::HEADER_TRACEPARENT.into(), trace);
        let read = envelope::attempt(Some(&headers));
        prop_assert_eq!(i128::from(read), expected.clamp(0, i128::from(u32::MAX)));
        let properties = lapin::BasicProperties::default().with_headers(headers);
        let _ = fleet_shared::trace::TraceParent::of(&properties);
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
