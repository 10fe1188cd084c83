//! schema/images.schema.json is generated from the manifest types; this test fails when the
//! checked-in file is stale. Regenerate with `FERRY_BLESS=1 cargo test --test schema`.

#[test]
fn checked_in_schema_matches_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/images.schema.json");
    let generated = serde_json::to_string_pretty(&ferry::manifest::json_schema()).unwrap() + "\n";
    if std::env::var_os("FERRY_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "schema/images.schema.json is out of date; run `FERRY_BLESS=1 cargo test --test schema` and commit it"
    );
}

#[test]
fn schema_describes_the_documented_keys() {
    let schema = ferry::manifest::json_schema();
    let image = &schema["$defs"]["ImageSection"]["properties"];
    for key in [
        "context",
        "dockerfile",
        "version",
        "args",
        "labels",
        "target",
        "repository",
        "depends_on",
        "tags",
    ] {
        assert!(image.get(key).is_some(), "images.*.{key} missing from the schema");
    }
    assert_eq!(schema["$defs"]["ImageSection"]["additionalProperties"], false);
    let env = &schema["$defs"]["EnvironmentSection"]["properties"];
    for key in ["registry", "tags", "require_version", "immutable", "promote_from", "release_only"]
    {
        assert!(env.get(key).is_some(), "environments.*.{key} missing from the schema");
    }
}
