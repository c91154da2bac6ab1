//! The conformance suite's own pieces: its HTTP client's framing, the
//! word matching of its expectations, and its case list.

use std::collections::HashSet;

use atp_conformance::{
    cases::names,
    client::{BaseUrl, Framing, Request, parse},
};

#[test]
fn parses_framings() {
    let r = parse(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        false,
        false,
    )
    .unwrap()
    .unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
    assert_eq!(
        parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}",
            false,
            false
        ),
        Ok(None)
    );
    assert!(
        parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}",
            false,
            true
        )
        .is_err()
    );
    let r = parse(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n1;x=y\r\n \r\n0\r\n\r\n",
        false,
        false,
    )
    .unwrap()
    .unwrap();
    assert_eq!((r.status, r.body.as_slice()), (404, &b"{} "[..]));
    assert_eq!(r.header("Transfer-Encoding"), Some("chunked"));
    let r = parse(b"HTTP/1.0 200 OK\r\n\r\nabc", false, true)
        .unwrap()
        .unwrap();
    assert_eq!(r.body, b"abc");
    assert_eq!(
        parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", true, false),
        Ok(None)
    );
    let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", true, true)
        .unwrap()
        .unwrap();
    assert!(r.body.is_empty());
    assert!(parse(b"garbage\r\n\r\n", false, true).is_err());
}

#[test]
fn frames_requests() {
    let bytes = Request::post("/x")
        .header("A", "b")
        .body("hello")
        .framing(Framing::Chunked)
        .to_bytes("h:1", "/base");
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        "POST /base/x HTTP/1.1\r\nHost: h:1\r\nConnection: close\r\nA: b\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let bytes = Request::post("/x").to_bytes("h:1", "");
    assert!(
        String::from_utf8(bytes)
            .unwrap()
            .ends_with("Content-Length: 0\r\n\r\n")
    );
    let bytes = Request::get("/x").to_bytes("h:1", "");
    assert!(!String::from_utf8(bytes).unwrap().contains("Content-Length"));
}

#[test]
fn base_urls() {
    let u = BaseUrl::parse("http://127.0.0.1:8080/").unwrap();
    assert_eq!(
        (u.authority.as_str(), u.path.as_str()),
        ("127.0.0.1:8080", "")
    );
    let u = BaseUrl::parse("http://localhost/api/").unwrap();
    assert_eq!(
        (u.authority.as_str(), u.path.as_str()),
        ("localhost:80", "/api")
    );
    assert!(BaseUrl::parse("https://x").is_err());
}

#[test]
fn names_are_whole_words() {
    assert!(names("Missing required parameters: a, b", "b"));
    assert!(!names("Missing required parameters: a", "b"));
    assert!(names("Unknown parameters: zz_one; x", "zz_one"));
    assert!(!names("Unknown parameters: zz_one", "zz"));
}

#[test]
fn case_names_are_unique() {
    let cases = atp_conformance::all_cases();
    let names: HashSet<&str> = cases.iter().map(|(n, _)| *n).collect();
    assert_eq!(names.len(), cases.len());
    assert!(cases.len() > 100);
}
