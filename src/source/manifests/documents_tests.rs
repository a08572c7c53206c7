//! Splitting and the nesting pre-check.

use super::*;

#[test]
fn error_line_numbers_are_shifted_to_the_file() {
    assert_eq!(
        shift_line_numbers(
            "x at line 2 column 18, while parsing at line 1 column 3",
            10
        ),
        "x at line 12 column 18, while parsing at line 11 column 3"
    );
    assert_eq!(shift_line_numbers("no line numbers", 5), "no line numbers");
}

#[test]
fn ordinary_manifests_are_well_within_the_depth_limit() {
    let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  labels: {a: b}\nspec:\n  ports:\n    - name: x\n      port: 80\n  selector:\n    app: [a, {b: [c]}]\n";
    assert!(!exceeds_depth(text, 8));
    assert!(exceeds_depth(text, 3));
}

#[test]
fn brackets_inside_quotes_comments_and_block_scalars_do_not_count() {
    let text = "a: \"[[[[[[[[[[\"\nb: '{{{{{{{{{{'\n# [[[[[[[[[[[[[[\nc: |\n  [[[[[[[[[[[[\n  {{{{{{{{{{{\nd: it's [ok]\n";
    assert!(!exceeds_depth(text, 4), "counted text as nesting");
}

#[test]
fn deep_flow_and_compact_block_nesting_are_caught() {
    assert!(exceeds_depth(&"[".repeat(100), 64));
    assert!(exceeds_depth(&format!("{{\"a\": {}", "[".repeat(70)), 64));
    assert!(exceeds_depth(&format!("{}x\n", "- ".repeat(70)), 64));
    let indented: String = (0..70)
        .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
        .collect();
    assert!(exceeds_depth(&indented, 64));
}

#[test]
fn the_depth_check_is_linear_on_adversarial_input() {
    let started = std::time::Instant::now();
    for text in [
        "[".repeat(1_000_000),
        "- ".repeat(500_000),
        "\"".repeat(1_000_000),
        "a: b\n".repeat(200_000),
    ] {
        exceeds_depth(&text, 64);
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn json_documents_borrow_the_text_and_keep_their_first_line() {
    let text = "{\"a\": 1}\n{\"b\":\n 2}\n{\"c\": ";
    let docs = split_json(text);
    let got: Vec<(usize, &str)> = docs.iter().map(|d| (d.first_line, d.body)).collect();
    assert_eq!(
        got,
        [(0, "{\"a\": 1}"), (0, "\n{\"b\":\n 2}"), (2, "\n{\"c\": ")]
    );
}
