//! Meraki-style error bodies (`{"errors": ["..."]}`), the shape clients such as the official
//! Python SDK read (`errors[0]`) to decide what to do.

use bytes::Bytes;

/// Serializes one message as a Meraki error body.
pub fn body(message: &str) -> Bytes {
    let value = serde_json::json!({ "errors": [message] });
    Bytes::from(value.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn body_is_meraki_shaped_and_escaped() {
        let b = super::body("bad \"key\"");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["errors"][0], "bad \"key\"");
    }
}
