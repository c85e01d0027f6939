use super::*;

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default()).expect("open store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_reopen_with_delivery_marks() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        let q = StoreQueueId(7);
        let t = s
            .submit(vec![
                Op::PutMessage {
                    queue: q,
                    seq: 1,
                    data: Bytes::from_static(b"one"),
                },
                Op::PutMessage {
                    queue: q,
                    seq: 2,
                    data: Bytes::from_static(b"two"),
                },
                Op::PutMessage {
                    queue: q,
                    seq: 3,
                    data: Bytes::from_static(b"three"),
                },
                Op::PutMessage {
                    queue: StoreQueueId(8),
                    seq: 1,
                    data: Bytes::from_static(b"other"),
                },
                Op::MarkDelivered { queue: q, seq: 2 },
                Op::DeleteMessage { queue: q, seq: 1 },
                Op::PutMeta {
                    key: b"q/a".to_vec(),
                    value: b"A".to_vec(),
                },
                Op::PutMeta {
                    key: b"x/b".to_vec(),
                    value: b"B".to_vec(),
                },
            ])
            .await
            .unwrap();
        s.wait_synced(t).await.unwrap();
        s.close();
    }
    let s = open(dir.path());
    let msgs = s.load_queue(StoreQueueId(7)).unwrap();
    let got: Vec<_> = msgs
        .iter()
        .map(|m| (m.seq, m.data.clone(), m.delivered))
        .collect();
    assert_eq!(
        got,
        vec![
            (2, Bytes::from_static(b"two"), true),
            (3, Bytes::from_static(b"three"), false)
        ]
    );
    assert_eq!(
        s.meta_scan(b"q/").unwrap(),
        vec![(b"q/a".to_vec(), b"A".to_vec())]
    );
    assert_eq!(s.load_queue(StoreQueueId(8)).unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_queue_messages_is_a_range() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut ops = Vec::new();
    for seq in 0..1000 {
        ops.push(Op::PutMessage {
            queue: StoreQueueId(1),
            seq,
            data: Bytes::from_static(b"m"),
        });
        ops.push(Op::PutMessage {
            queue: StoreQueueId(2),
            seq,
            data: Bytes::from_static(b"m"),
        });
    }
    ops.push(Op::DeleteQueueMessages {
        queue: StoreQueueId(1),
    });
    let t = s.submit(ops).await.unwrap();
    s.wait_synced(t).await.unwrap();
    assert!(s.load_queue(StoreQueueId(1)).unwrap().is_empty());
    assert_eq!(s.load_queue(StoreQueueId(2)).unwrap().len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_synced_in_order_under_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut tasks = Vec::new();
    for p in 0..8u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200u64 {
                let t = s
                    .submit(vec![Op::PutMessage {
                        queue: StoreQueueId(p),
                        seq: i,
                        data: Bytes::from(vec![0u8; 64]),
                    }])
                    .await
                    .unwrap();
                if i % 50 == 0 {
                    s.wait_synced(t).await.unwrap();
                    // Everything this task submitted before is durable too.
                    assert_eq!(s.load_queue(StoreQueueId(p)).unwrap().len() as u64, i + 1);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[test]
fn schema_version_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut o = Options::default();
        o.create_if_missing(true);
        o.create_missing_column_families(true);
        let db = DB::open_cf(&o, dir.path(), [CF_META, CF_MSGS, CF_DELIVERED]).unwrap();
        let cf = db.cf_handle(CF_META).unwrap();
        db.put_cf(cf, SCHEMA_KEY, 99u32.to_be_bytes()).unwrap();
    }
    match Store::open(dir.path(), StoreOptions::default()) {
        Err(StoreError::Schema {
            found: 99,
            expected: SCHEMA_VERSION,
        }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a store of an unknown schema"),
    }
}
