//! Conversions between protobuf well-known types and mboxd's representations.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Timestamp, Value};

use crate::model::Micros;

use super::status::ApiError;

/// Latest accepted timestamp: 9999-12-31T23:59:59Z, as protobuf's Timestamp allows.
const MAX_SECONDS: i64 = 253_402_300_799;

/// A timestamp as protobuf carries it.
pub fn timestamp(at: Micros) -> Timestamp {
    Timestamp {
        seconds: at.div_euclid(1_000_000),
        nanos: (at.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// A protobuf timestamp in microseconds, checked against protobuf's valid range
/// (0001-01-01 to 9999-12-31, nanos in 0..1e9).
pub fn micros(field: impl std::fmt::Display, ts: &Timestamp) -> Result<Micros, ApiError> {
    if !(-62_135_596_800..=MAX_SECONDS).contains(&ts.seconds)
        || !(0..1_000_000_000).contains(&ts.nanos)
    {
        return Err(ApiError::invalid(
            field.to_string(),
            format!(
                "timestamp out of range (seconds={}, nanos={})",
                ts.seconds, ts.nanos
            ),
        ));
    }
    Ok(ts.seconds * 1_000_000 + i64::from(ts.nanos) / 1000)
}

/// A protobuf `Value` as JSON. Non-finite numbers have no JSON form and are rejected.
/// `field` (the path, for errors) becomes a string only if the value is invalid.
pub fn value_to_json(
    field: &dyn std::fmt::Display,
    value: Value,
) -> Result<serde_json::Value, ApiError> {
    Ok(match value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n)
            .map(serde_json::Value::Number)
            .ok_or_else(|| {
                ApiError::invalid(field.to_string(), format!("number {n} is not finite"))
            })?,
        Some(Kind::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .into_iter()
                .map(|(k, v)| value_to_json(&format_args!("{field}.{k}"), v).map(|v| (k, v)))
                .collect::<Result<_, _>>()?,
        ),
        Some(Kind::ListValue(l)) => serde_json::Value::Array(
            l.values
                .into_iter()
                .enumerate()
                .map(|(i, v)| value_to_json(&format_args!("{field}[{i}]"), v))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// JSON as a protobuf `Value`.
pub fn json_to_value(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.into_iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(Struct {
            fields: o.into_iter().map(|(k, v)| (k, json_to_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trip() {
        let j = json!({"a": [1.5, "x", true, null], "b": {"c": 2.0}});
        let v = json_to_value(j.clone());
        assert_eq!(value_to_json(&"m", v).unwrap(), j);
    }

    #[test]
    fn non_finite_numbers_name_the_field() {
        let v = json_to_value(json!({"inner": 1.0}));
        let Some(Kind::StructValue(mut s)) = v.kind else {
            panic!()
        };
        s.fields.insert(
            "bad".into(),
            Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );
        let err = value_to_json(
            &"metadata.cfg",
            Value {
                kind: Some(Kind::StructValue(s)),
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "metadata.cfg.bad: number NaN is not finite"
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(micros("t", &timestamp(1_234_567)).unwrap(), 1_234_567);
        assert_eq!(micros("t", &timestamp(-1)).unwrap(), -1);
        assert!(
            micros(
                "t",
                &Timestamp {
                    seconds: MAX_SECONDS + 1,
                    nanos: 0
                }
            )
            .is_err()
        );
        assert!(
            micros(
                "t",
                &Timestamp {
                    seconds: 0,
                    nanos: -1
                }
            )
            .is_err()
        );
    }
}
