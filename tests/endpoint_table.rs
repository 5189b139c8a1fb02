//! The committed API table (`src/endpoints/meraki-api-v1.tsv`) is what the generator makes from
//! the pinned SDK and Meraki's API index (`data/meraki-api-oauth-scopes.tsv`): the generator's
//! own staleness check (`--check`), run here with the SDK's interpreter (`MERAKI_SDK_PYTHON`, by
//! default `.venv/bin/python` from `bash scripts/python-env.sh`). A changed scope in the index is
//! noticed.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let py = std::env::var_os("MERAKI_SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(
        py.exists(),
        "no Python interpreter at {}: run `bash scripts/python-env.sh` (or set MERAKI_SDK_PYTHON)",
        py.display()
    );
    py
}

fn check(scopes: &std::path::Path) -> std::process::Output {
    Command::new(python())
        .arg(repo().join("scripts/gen-endpoint-table.py"))
        .arg("--check")
        .arg(repo().join("src/endpoints/meraki-api-v1.tsv"))
        .arg("--scopes")
        .arg(scopes)
        .current_dir(repo())
        .output()
        .unwrap()
}

#[test]
fn the_committed_table_is_the_generated_one() {
    let out = check(&repo().join("data/meraki-api-oauth-scopes.tsv"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "regenerate with `python scripts/gen-endpoint-table.py --output src/endpoints/meraki-api-v1.tsv`:\n{stderr}"
    );
    assert!(
        stderr.contains("1039 operations, 844 with a scope"),
        "{stderr}"
    );
}

#[test]
fn a_changed_scope_in_merakis_index_is_noticed() {
    let index = std::fs::read_to_string(repo().join("data/meraki-api-oauth-scopes.tsv")).unwrap();
    let line = "updateNetwork\tPUT\t/networks/{networkId}\t";
    assert!(index.contains(line), "updateNetwork is in the index");
    let changed = index.replacen(
        &format!("{line}GA\tdashboard:general:config:write"),
        &format!("{line}GA\tdashboard:general:config:read"),
        1,
    );
    assert_ne!(changed, index, "the test edits a row");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scopes.tsv");
    std::fs::write(&path, changed).unwrap();
    let out = check(&path);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A row whose path disagrees with the SDK stops the generator.
    let moved = index.replacen(line, "updateNetwork\tPUT\t/networks/{networkId}/moved\t", 1);
    std::fs::write(&path, moved).unwrap();
    let out = check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("updateNetwork"), "{stderr}");
}
