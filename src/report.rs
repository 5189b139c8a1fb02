//! Errors as logs and messages show them: the error and its causes, `outer: inner: innermost`
//! (linkerd's error chains). A leaf module, so every other module can use it.

use std::error::Error;

/// An error and its causes, each named once.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn chains_name_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner cause"));
        assert_eq!(super::chain(&e), "outer: inner cause");
    }
}
