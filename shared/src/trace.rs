//! W3C trace context (`traceparent`, <https://www.w3.org/TR/trace-context/>): one trace id from
//! the HTTP submit (or the caller's own header) through the task's headers, the consumer's span
//! and the result, so every log line about a task can be found by its trace id.
//!
//! Each hop keeps the trace id and names itself as the parent with a new span id
//! ([`TraceParent::child`]).

use lapin::types::AMQPValue;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use std::fmt;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// A `traceparent` value: version 00, trace id, parent (span) id and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: u128,
    parent_id: u64,
    flags: u8,
}

impl TraceParent {
    /// A new trace, sampled: random trace and span ids.
    pub fn root() -> Self {
        let mut rng = rand::rng();
        Self {
            trace_id: nonzero_u128(&mut rng),
            parent_id: nonzero_u64(&mut rng),
            flags: 1,
        }
    }

    /// The same trace with a new span id: what this hop sends on.
    #[must_use]
    pub fn child(&self) -> Self {
        Self {
            parent_id: nonzero_u64(&mut rand::rng()),
            ..*self
        }
    }

    /// The message's `traceparent` header, if it has a valid one.
    pub fn of(properties: &lapin::BasicProperties) -> Option<Self> {
        let headers = properties.headers().as_ref()?;
        match headers.inner().get(crate::envelope::HEADER_TRACEPARENT)? {
            AMQPValue::LongString(s) => Self::parse(&String::from_utf8_lossy(s.as_bytes())),
            AMQPValue::ShortString(s) => Self::parse(s.as_str()),
            _ => None,
        }
    }

    /// Parses a `traceparent` header. Returns `None` for anything the spec says to ignore:
    /// version `ff`, a wrong length or separator, upper-case or non-hex digits, an all-zero id,
    /// or (for version 00) trailing data.
    pub fn parse(header: &str) -> Option<Self> {
        let bytes = header.as_bytes();
        if bytes.len() < 55 || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let version = hex(&header[0..2])?;
        if version == 0xff || (version == 0 && bytes.len() != 55) {
            return None;
        }
        if version != 0 && bytes.len() > 55 && bytes[55] != b'-' {
            return None;
        }
        let trace_id = hex(&header[3..35])?;
        let parent_id = u64::try_from(hex(&header[36..52])?).ok()?;
        let flags = u8::try_from(hex(&header[53..55])?).ok()?;
        (trace_id != 0 && parent_id != 0).then_some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// Makes `span` this hop of the trace: its parent is `incoming` (when there is one), and
    /// the returned `traceparent` (what this hop sends on) names `span` itself when spans are
    /// exported (`log.otlp_endpoint`), else a new span id in the same trace, or a new trace.
    pub fn continue_in(span: &tracing::Span, incoming: Option<Self>) -> Self {
        if let Some(incoming) = incoming {
            let remote = SpanContext::new(
                TraceId::from_bytes(incoming.trace_id.to_be_bytes()),
                SpanId::from_bytes(incoming.parent_id.to_be_bytes()),
                TraceFlags::new(incoming.flags),
                true,
                TraceState::default(),
            );
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        }
        let exported = span.context().span().span_context().clone();
        if exported.is_valid() {
            Self {
                trace_id: u128::from_be_bytes(exported.trace_id().to_bytes()),
                parent_id: u64::from_be_bytes(exported.span_id().to_bytes()),
                flags: exported.trace_flags().to_u8(),
            }
        } else {
            incoming.map_or_else(Self::root, |incoming| incoming.child())
        }
    }

    /// The trace id as 32 lower-case hex digits, as logs show it.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The parent (span) id as 16 lower-case hex digits.
    pub fn parent_id(&self) -> String {
        format!("{:016x}", self.parent_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

/// Lower-case hex digits only (the spec forbids upper case), as a number.
fn hex(digits: &str) -> Option<u128> {
    if digits
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        u128::from_str_radix(digits, 16).ok()
    } else {
        None
    }
}

fn nonzero_u128(rng: &mut impl rand::RngCore) -> u128 {
    loop {
        let mut bytes = [0u8; 16];
        rng.fill_bytes(&mut bytes);
        let n = u128::from_be_bytes(bytes);
        if n != 0 {
            return n;
        }
    }
}

fn nonzero_u64(rng: &mut impl rand::RngCore) -> u64 {
    loop {
        let n = rng.next_u64();
        if n != 0 {
            return n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TraceParent;

    const SPEC_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_header_round_trips_and_a_child_keeps_the_trace() {
        let parsed = TraceParent::parse(SPEC_EXAMPLE).expect("the spec's example");
        assert_eq!(parsed.to_string(), SPEC_EXAMPLE);
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = parsed.child();
        assert_eq!(child.trace_id(), parsed.trace_id());
        assert_ne!(child.parent_id(), parsed.parent_id());
        assert_eq!(TraceParent::parse(&child.to_string()), Some(child));
        let root = TraceParent::root();
        assert_eq!(TraceParent::parse(&root.to_string()), Some(root));
    }

    #[test]
    fn what_the_spec_says_to_ignore_is_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version may append fields after a dash; the first four still count.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what")
                .is_some()
        );
    }
}
