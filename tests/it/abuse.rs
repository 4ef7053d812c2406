//! The real `ipn-ingress` binary under hostile HTTP: oversized and endless bodies, slowloris
//! headers, a thousand idle connections, random methods and paths, bytes that are not UTF-8 in
//! headers. It must stay up, keep its memory bounded, and go on answering 200 to valid IPNs.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::ingress::ingress_binary;
use crate::support::{TestBroker, post_form, sample};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    line.split_whitespace()
        .nth(1)
        .expect("value")
        .parse()
        .expect("number")
}

/// Sends `request`, then reads whatever comes back until the server closes or 5 s pass; returns
/// the status line's code, if any.
async fn exchange(port: u16, request: Vec<u8>) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let _ = stream.write_all(&request).await;
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&answer[..n]).into_owned();
    text.split_whitespace().nth(1)?.parse().ok()
}

/// A chunked body that never ends: 4 KiB chunks until the server answers or stops reading.
async fn endless_chunks(port: u16) -> Option<u16> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let (mut read, mut write) = stream.into_split();
    let head = "POST /ipn HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ntransfer-encoding: chunked\r\n\r\n";
    write.write_all(head.as_bytes()).await.ok()?;
    let chunk = format!("1000\r\n{}\r\n", "a=b&".repeat(1024));
    let writer = tokio::spawn(async move {
        // Past 64 MiB (a thousand times the body limit) the server failed to stop it.
        for _ in 0..16_384 {
            if write.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(30), read.read(&mut answer))
        .await
        .ok()?
        .ok()?;
    writer.abort();
    String::from_utf8_lossy(&answer[..n])
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Sends a header byte every 100 ms, forever; returns when the server closes the connection.
async fn slowloris(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let _ = stream.write_all(b"POST /ipn HTTP/1.1\r\nx-slow: ").await;
    for _ in 0..600 {
        if stream.write_all(b"a").await.is_err() {
            return true;
        }
        let mut probe = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => return true, // an error answer before closing also ends it
            Err(_) => {}
        }
    }
    false
}

#[tokio::test]
async fn hostile_http_leaves_the_ingress_up_bounded_and_answering_valid_ipns() {
    let broker = TestBroker::new().await;
    let limits = [
        ("IPN_INGRESS__HEADER_READ_TIMEOUT", "1s"),
        ("IPN_INGRESS__BODY_READ_TIMEOUT", "1s"),
    ];
    let (child, port) = ingress_binary(&broker, &limits).await;
    let pid = child.id().expect("running");
    let url = format!("http://127.0.0.1:{port}/ipn");
    assert_eq!(post_form(&url, sample("001_web_accept.txt")).await.0, 200);
    let before = rss_kib(pid);

    let idle: Vec<TcpStream> = {
        let mut idle = Vec::new();
        for _ in 0..1000 {
            idle.push(
                TcpStream::connect(("127.0.0.1", port))
                    .await
                    .expect("connect"),
            );
        }
        idle
    };
    let mut abuse = tokio::task::JoinSet::new();
    for _ in 0..20 {
        abuse.spawn(async move {
            let huge = "POST /ipn HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 104857600\r\n\r\na=b";
            ("declared 100 MiB", exchange(port, huge.as_bytes().to_vec()).await)
        });
        abuse.spawn(async move { ("endless chunks", endless_chunks(port).await) });
        abuse.spawn(async move { ("slowloris", Some(u16::from(slowloris(port).await))) });
    }
    for n in 0..100 {
        abuse.spawn(async move {
            let method = ["GET", "PUT", "DELETE", "PATCH", "FOO", "OPTIONS"][n % 6];
            let request = format!("{method} /random/{n}?x={n} HTTP/1.1\r\nhost: x\r\n\r\n");
            (
                "random method and path",
                exchange(port, request.into_bytes()).await,
            )
        });
        abuse.spawn(async move {
            let mut request = b"POST /ipn HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\nx-bad: ".to_vec();
            request.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28, 0x80]);
            request.extend_from_slice(b"\r\ncontent-length: 3\r\n\r\na=b");
            ("invalid UTF-8 header", exchange(port, request).await)
        });
    }
    // Valid IPNs while all of that goes on.
    let mut valid = Vec::new();
    for n in 0..40 {
        let mut body = sample("013_subscr_payment.txt");
        body.extend_from_slice(format!("&abuse_seq={n}").as_bytes());
        valid.push(post_form(&url, body).await.0);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        valid.iter().all(|s| *s == 200),
        "valid IPNs during the abuse: {valid:?}"
    );

    while let Some(done) = abuse.join_next().await {
        let (what, answer) = done.expect("abuser task");
        match what {
            "declared 100 MiB" => assert_eq!(answer, Some(413), "{what}"),
            "endless chunks" => assert!(
                matches!(answer, Some(413) | Some(408)),
                "{what}: {answer:?}"
            ),
            "slowloris" => assert_eq!(answer, Some(1), "the header timeout closed it"),
            "random method and path" => {
                assert!(
                    matches!(answer, Some(404) | Some(405)),
                    "{what}: {answer:?}"
                )
            }
            _ => assert!(
                matches!(answer, Some(200) | Some(400)),
                "{what}: {answer:?}"
            ),
        }
    }
    drop(idle);
    let after = rss_kib(pid);
    assert!(
        after < before + 64 * 1024,
        "resident memory grew from {before} KiB to {after} KiB"
    );
    let health = crate::support::http_get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .expect("up");
    assert_eq!(health.status(), 200);
    assert_eq!(post_form(&url, sample("002_refunded.txt")).await.0, 200);
}
