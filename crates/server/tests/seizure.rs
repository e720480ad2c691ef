//! SEIZURE.md is the list of everything the server stores; this test holds it to that: every
//! table and column of the SQLite schema (after all migrations) must be described in it, and
//! every table it describes (before its PostgreSQL section) must exist. A new column without a
//! line in SEIZURE.md fails here.
//! Not for: what the stored values reveal in a real run (the seizure drill in
//! `crates/cli/tests/seizure.rs` checks that).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use blindpost_server::store::SqliteStore;
use blindpost_server::store::sqlite::DATABASE_FILE;

const SEIZURE_MD: &str = include_str!("../../../SEIZURE.md");

type Schema = BTreeMap<String, BTreeSet<String>>;

/// The tables and columns SEIZURE.md describes. A section `## \`table\` …` opens a table; in its
/// tables, the first cell names columns in backticks (`a`, `b`), and `other.column` switches to
/// another table for that row and the ones after it.
fn documented(md: &str) -> Schema {
    let mut schema = Schema::new();
    let mut current: Option<String> = None;
    for line in md.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            current = backticked(heading).into_iter().next();
            if let Some(t) = &current {
                schema.entry(t.clone()).or_default();
            }
            continue;
        }
        let Some(row) = line.strip_prefix('|') else {
            continue;
        };
        let Some(first_cell) = row.split('|').next() else {
            continue;
        };
        for name in backticked(first_cell) {
            let column = match name.split_once('.') {
                Some((table, column)) => {
                    current = Some(table.to_owned());
                    column.to_owned()
                }
                None => name,
            };
            if let Some(table) = &current {
                schema.entry(table.clone()).or_default().insert(column);
            }
        }
    }
    schema
}

/// SEIZURE.md up to its `## PostgreSQL` section, which describes what only that backend adds
/// (e.g. `kt_keys`, where SQLite keeps key files).
fn sqlite_part(md: &str) -> &str {
    md.split("\n## PostgreSQL\n").next().unwrap_or(md)
}

fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Tables and columns of a SQLite database (SQLite's own tables excluded).
fn sqlite_schema(conn: &rusqlite::Connection) -> Schema {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    tables
        .into_iter()
        .map(|t| {
            let columns = conn
                .prepare(&format!("SELECT name FROM pragma_table_info('{t}')"))
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            (t, columns)
        })
        .collect()
}

/// What `actual` has that `doc` does not describe, and tables `doc` names that do not exist.
fn differences(actual: &Schema, doc: &Schema) -> Vec<String> {
    let mut out = Vec::new();
    for (table, columns) in actual {
        match doc.get(table) {
            None => out.push(format!("table `{table}` is not in SEIZURE.md")),
            Some(described) => {
                for c in columns.difference(described) {
                    out.push(format!("column `{table}.{c}` is not in SEIZURE.md"));
                }
                for c in described.difference(columns) {
                    out.push(format!(
                        "SEIZURE.md describes `{table}.{c}`, which does not exist"
                    ));
                }
            }
        }
    }
    for table in doc.keys().filter(|t| !actual.contains_key(*t)) {
        out.push(format!(
            "SEIZURE.md describes table `{table}`, which does not exist"
        ));
    }
    out
}

#[test]
fn every_sqlite_table_and_column_is_described_in_seizure_md() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), Arc::new(|| 1)).unwrap();
    let conn = rusqlite::Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
    let actual = sqlite_schema(&conn);
    assert!(actual.contains_key("messages"), "{actual:?}");
    let problems = differences(&actual, &documented(sqlite_part(SEIZURE_MD)));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    drop(store);
}

#[test]
fn the_check_notices_an_undocumented_column() {
    let doc = documented(SEIZURE_MD);
    let mut actual = doc.clone();
    actual
        .get_mut("queues")
        .unwrap()
        .insert("owner_ip".to_owned());
    actual.insert("audit".to_owned(), ["at".to_owned()].into());
    let problems = differences(&actual, &doc);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("audit") || problems[1].contains("audit"));
    assert!(problems.iter().any(|p| p.contains("queues.owner_ip")));
}

#[test]
fn the_parser_reads_shared_rows_and_qualified_names() {
    let doc = documented(SEIZURE_MD);
    assert!(doc["groups"].contains("created_day") && doc["groups"].contains("last_used_day"));
    assert!(doc["key_packages"].contains("data") && doc["key_packages"].contains("box_id"));
    assert!(doc["key_package_boxes"].contains("secret_hash"));
    assert!(!doc["key_package_boxes"].contains("data"));
}
