//! Each Lua script's header (`-- KEYS[n]`, `-- ARGV[n]`, `-- Returns:`) must
//! match what the script does, checked against a real redis-server: the keys
//! and arguments it reads are exactly the documented ones, and a call with the
//! documented keys and arguments returns the documented shape.

use omcb_store::redis::lua;
use omcb_testkit::{RedisServer, Resp};

struct Header {
    keys: usize,
    args: usize,
    /// Items in a `Returns: {a, b, c}` array, or `None` for a number.
    returns: Option<usize>,
}

fn header(src: &str) -> Header {
    let lines: Vec<&str> = src.lines().take_while(|l| l.starts_with("--")).collect();
    let count = |prefix: &str| lines.iter().filter(|l| l.starts_with(prefix)).count();
    let returns =
        lines.iter().find_map(|l| l.strip_prefix("-- Returns: ")).expect("a Returns line");
    // Count the top-level items of `{a, b (note, with commas), c}`.
    let returns = returns.strip_prefix('{').map(|r| {
        let mut depth = 0;
        let mut items = 1;
        for ch in r.chars().take_while(|&c| c != '}') {
            match ch {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => items += 1,
                _ => {}
            }
        }
        items
    });
    Header { keys: count("-- KEYS["), args: count("-- ARGV["), returns }
}

/// The highest `KEYS[n]` / `ARGV[n]` the body uses.
fn used(src: &str, name: &str) -> usize {
    let body: String = src.lines().filter(|l| !l.starts_with("--")).collect::<Vec<_>>().join("\n");
    let mut max = 0;
    let pat = format!("{name}[");
    let mut rest = body.as_str();
    while let Some(i) = rest.find(&pat) {
        rest = &rest[i + pat.len()..];
        let n: usize = rest[..rest.find(']').unwrap()].parse().unwrap();
        max = max.max(n);
    }
    max
}

const BOARD_KEYS: [&str; 8] = [
    "{t}:config",
    "{t}:bits",
    "{t}:frozen",
    "{t}:count",
    "{t}:frozen_count",
    "{t}:seq",
    "{t}:log",
    "{t}:checked_at",
];

/// `EVAL src` with `keys` and `args`: the reply, an error included.
fn call(redis: &RedisServer, src: &str, keys: &[&str], args: &[&str]) -> Resp {
    let n = keys.len().to_string();
    let mut cmd = vec!["EVAL", src, n.as_str()];
    cmd.extend_from_slice(keys);
    cmd.extend_from_slice(args);
    redis.command(&cmd).unwrap()
}

/// `call` that must succeed.
fn eval(redis: &RedisServer, src: &str, keys: &[&str], args: &[&str]) -> Resp {
    let reply = call(redis, src, keys, args);
    assert!(!matches!(reply, Resp::Error(_)), "script failed: {reply:?}");
    reply
}

/// The items of an array reply.
fn items(reply: &Resp) -> &[Resp] {
    let Resp::Array(Some(items)) = reply else { panic!("not an array: {reply:?}") };
    items
}

/// A compare-and-set script's answer (`rebirth.lua`, `restore.lua`): whether
/// it wrote (1 or 0), and the epoch now.
fn written_and_epoch(reply: &Resp) -> (&Resp, Option<&str>) {
    let items = items(reply);
    (&items[0], items[1].as_str())
}

fn check_shape(name: &str, h: &Header, reply: &Resp) {
    match (h.returns, reply) {
        (Some(n), Resp::Array(Some(items))) => {
            assert_eq!(items.len(), n, "{name}: documented {n} return items")
        }
        (None, Resp::Int(_)) => {}
        other => {
            panic!("{name}: reply {reply:?} does not match the documented shape ({:?})", other.0)
        }
    }
}

#[test]
fn headers_name_exactly_the_keys_and_arguments_used() {
    for (name, src) in [
        ("init", lua::INIT),
        ("set", lua::SET),
        ("snapshot", lua::SNAPSHOT),
        ("sweep", lua::SWEEP),
        ("lease", lua::LEASE),
        ("position", lua::POSITION),
        ("rebirth", lua::REBIRTH),
        ("restore", lua::RESTORE),
    ] {
        let h = header(src);
        assert_eq!(used(src, "KEYS"), h.keys, "{name}.lua: KEYS documented vs used");
        assert_eq!(used(src, "ARGV"), h.args, "{name}.lua: ARGV documented vs used");
    }
}

#[test]
fn scripts_called_as_documented_answer_as_documented() {
    let redis = RedisServer::start().unwrap();
    // init: creates once; the existing board wins; refuses to resize.
    let h = header(lua::INIT);
    let args = ["1000", "0", "50", "12345678901234567890"];
    let reply = eval(&redis, lua::INIT, &BOARD_KEYS[..h.keys], &args[..h.args]);
    check_shape("init", &h, &reply);
    let created = items(&reply);
    assert_eq!(created[0], Resp::Int(1), "created");
    assert_eq!(created[4].as_str(), Some("12345678901234567890"), "the epoch keeps all its digits");
    let again = eval(&redis, lua::INIT, &BOARD_KEYS, &["1000", "5", "0", "1"]);
    let kept = items(&again);
    assert_eq!((&kept[0], &kept[2]), (&Resp::Int(0), &Resp::Int(0)), "existing board wins");
    let resize = call(&redis, lua::INIT, &BOARD_KEYS, &["2000", "0", "0", "1"]);
    assert!(matches!(resize, Resp::Error(e) if e.contains("BOARDSIZE")));

    // set: the epoch, then status, value, seq; a retried call (same op key) answers the same.
    let h = header(lua::SET);
    let mut keys = BOARD_KEYS.to_vec();
    keys.push("{t}:op:test:1");
    let one = ["1000", "60000", "5", "1", "0"];
    assert_eq!(h.args, 2, "set.lua: two arguments, then three per item");
    let reply = eval(&redis, lua::SET, &keys[..h.keys], &one);
    check_shape("set", &h, &reply);
    assert_eq!(reply, eval(&redis, lua::SET, &keys, &one), "a retry answers the same");
    assert_eq!(&items(&reply)[1..], &[Resp::Int(1), Resp::Int(1), Resp::Int(1)]);
    assert_eq!(
        items(&reply)[0].as_str(),
        Some("12345678901234567890"),
        "a stored answer keeps every digit"
    );
    // A call that changed nothing stores no answer (its retry may run it again).
    keys[8] = "{t}:op:test:noop";
    let reply = eval(&redis, lua::SET, &keys, &one);
    assert_eq!(&items(&reply)[1..], &[Resp::Int(0), Resp::Int(1), Resp::Int(0)]);
    assert_eq!(redis.command(&["EXISTS", "{t}:op:test:noop"]).unwrap(), Resp::Int(0));
    keys[8] = "{t}:op:test:2";
    let reply = eval(&redis, lua::SET, &keys, &["1000", "60000", "1000", "1", "0"]);
    assert_eq!(items(&reply)[1], Resp::Int(-1), "out of range");
    assert_eq!(
        redis.command(&["STRLEN", "{t}:bits"]).unwrap(),
        Resp::Int(1),
        "the bitset did not grow"
    );

    // snapshot
    let h = header(lua::SNAPSHOT);
    let reply = eval(&redis, lua::SNAPSHOT, &BOARD_KEYS[..h.keys], &[]);
    check_shape("snapshot", &h, &reply);

    // sweep: a number
    let h = header(lua::SWEEP);
    let keys: Vec<&str> = BOARD_KEYS.into_iter().filter(|k| *k != "{t}:bits").collect();
    let reply = eval(&redis, lua::SWEEP, &keys[..h.keys], &["10", "1000"][..h.args]);
    check_shape("sweep", &h, &reply);

    // position: epoch, seq and the entries asked for, each tagged with its epoch.
    let h = header(lua::POSITION);
    let keys = ["{t}:config", "{t}:seq", "{t}:log"];
    let reply = eval(&redis, lua::POSITION, &keys[..h.keys], &["1", "0"][..h.args]);
    check_shape("position", &h, &reply);
    let position = items(&reply);
    assert_eq!(position[0].as_str(), Some("12345678901234567890"));
    // entries at seq 1 -> the entry -> its fields
    let fields = items(&items(&items(&position[2])[0])[1]);
    let epoch = fields.chunks(2).find(|kv| kv[0].as_str() == Some("e")).map(|kv| kv[1].as_str());
    assert_eq!(epoch, Some(Some("12345678901234567890")), "the entry carries its epoch");
    assert_eq!(position[3], Resp::Array(Some(vec![])), "seq 0 asks for nothing");

    // rebirth: a compare-and-set on the epoch; only the first caller moves it.
    let h = header(lua::REBIRTH);
    let reply =
        eval(&redis, lua::REBIRTH, &["{t}:config"][..h.keys], &["12345678901234567890", "7"]);
    check_shape("rebirth", &h, &reply);
    assert_eq!(written_and_epoch(&reply), (&Resp::Int(1), Some("7")));
    let again = eval(&redis, lua::REBIRTH, &["{t}:config"], &["12345678901234567890", "8"]);
    assert_eq!(written_and_epoch(&again), (&Resp::Int(0), Some("7")), "moved once");

    // restore: writes the replica when the board is gone or still has the
    // epoch that lost changes; seq never goes back; only the first caller.
    let keys: Vec<String> = BOARD_KEYS.iter().map(|k| k.replace("{t}", "{r}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let h = header(lua::RESTORE);
    let args = ["5", "6", "1000", "0", "50", "A", "", "1", "0", "41", "0"];
    let reply = eval(&redis, lua::RESTORE, &keys[..h.keys], &args);
    check_shape("restore", &h, &reply);
    assert_eq!(written_and_epoch(&reply), (&Resp::Int(1), Some("6")));
    assert_eq!(redis.command(&["GET", "{r}:seq"]).unwrap().as_str(), Some("41"));
    assert_eq!(redis.command(&["ZCARD", "{r}:checked_at"]).unwrap(), Resp::Int(1));
    let again = eval(&redis, lua::RESTORE, &keys, &args);
    assert_eq!(written_and_epoch(&again), (&Resp::Int(0), Some("6")), "restored once");

    // lease: 1 for the holder, 0 for anyone else
    let h = header(lua::LEASE);
    let reply =
        eval(&redis, lua::LEASE, &["{t}:sweep_lease"][..h.keys], &["me", "10000"][..h.args]);
    check_shape("lease", &h, &reply);
    assert_eq!(reply, Resp::Int(1));
    assert_eq!(eval(&redis, lua::LEASE, &["{t}:sweep_lease"], &["other", "10000"]), Resp::Int(0));
    assert_eq!(eval(&redis, lua::LEASE, &["{t}:sweep_lease"], &["me", "10000"]), Resp::Int(1));
}

/// The status, value and seq of each item of a `set.lua` reply.
fn answers(reply: &Resp) -> Vec<[i64; 3]> {
    let ints = |r: &Resp| match r {
        Resp::Int(n) => *n,
        other => panic!("not a number: {other:?}"),
    };
    items(reply)[1..].chunks(3).map(|a| [ints(&a[0]), ints(&a[1]), ints(&a[2])]).collect()
}

/// A stream entry's field, if it has it.
fn field<'a>(entry: &'a Resp, name: &str) -> Option<&'a str> {
    let fields = items(&items(entry)[1]);
    fields.chunks(2).find(|kv| kv[0].as_str() == Some(name)).and_then(|kv| kv[1].as_str())
}

/// Several toggles in one `set.lua` call: each answered as if it were a call
/// of its own, in order (two on one box behave as two calls one after the
/// other), each change logged with its counts and origin; the call's
/// retry (fred resending it after a reconnect) answers every item the same
/// and changes nothing more.
#[test]
fn a_call_of_several_toggles_answers_each_in_order_and_exactly_once() {
    let redis = RedisServer::start().unwrap();
    eval(&redis, lua::INIT, &BOARD_KEYS, &["1000", "2", "0", "77"]);
    let mut keys = BOARD_KEYS.to_vec();
    keys.push("{t}:op:w:1");
    let mut args = vec!["1000", "60000"];
    for item in [
        ["1", "1", "00000000000000ff"], // changes: seq 1
        ["1", "1", "0"],                // already checked
        ["2", "1", "0"],                // seq 2; the board is full (max_checked 2)
        ["3", "1", "0"],                // refused: full
        ["1000", "1", "0"],             // out of range
        ["1", "0", "0"],                // seq 3
        ["3", "1", "0"],                // seq 4: there is room again
    ] {
        args.extend(item);
    }
    let reply = eval(&redis, lua::SET, &keys, &args);
    assert_eq!(items(&reply)[0].as_str(), Some("77"));
    let expected = [[1, 1, 1], [0, 1, 0], [1, 1, 2], [-3, 0, 0], [-1, 0, 0], [1, 0, 3], [1, 1, 4]];
    assert_eq!(answers(&reply), expected);
    let again = eval(&redis, lua::SET, &keys, &args);
    assert_eq!(again, reply, "the retried call answers every item the same");
    assert_eq!(
        redis.command(&["GET", "{t}:seq"]).unwrap().as_str(),
        Some("4"),
        "and changes nothing"
    );
    assert_eq!(redis.command(&["XLEN", "{t}:log"]).unwrap(), Resp::Int(4));
    assert_eq!(redis.command(&["GET", "{t}:count"]).unwrap().as_str(), Some("2"));
    let checked_at = redis.command(&["ZRANGE", "{t}:checked_at", "0", "-1"]).unwrap();
    let checked_at: Vec<_> = items(&checked_at).iter().map(|i| i.as_str().unwrap()).collect();
    assert_eq!(checked_at.len(), 2);
    assert!(checked_at.contains(&"2") && checked_at.contains(&"3"), "{checked_at:?}");
    let log = redis.command(&["XRANGE", "{t}:log", "-", "+"]).unwrap();
    let log = items(&log);
    let ids: Vec<_> = log.iter().map(|e| items(e)[0].as_str().unwrap()).collect();
    assert_eq!(ids, ["1-0", "2-0", "3-0", "4-0"]);
    let counts: Vec<_> = log.iter().map(|e| field(e, "c").unwrap()).collect();
    assert_eq!(counts, ["1", "2", "1", "2"], "each entry has the counts after its change");
    let ops: Vec<_> =
        log.iter().map(|e| (field(e, "i").unwrap(), field(e, "o").unwrap())).collect();
    assert_eq!(ops, [("1", "1"), ("2", "1"), ("1", "0"), ("3", "1")]);
    assert_eq!(field(&log[0], "a"), Some("00000000000000ff"), "the origin");
    assert!(log[1..].iter().all(|e| field(e, "a").is_none()), "no origin, no field");
    let bits: Vec<_> =
        (1..=3).map(|i| redis.command(&["GETBIT", "{t}:bits", &i.to_string()]).unwrap()).collect();
    assert_eq!(bits, [Resp::Int(0), Resp::Int(1), Resp::Int(1)]);

    // A bad item refuses the whole call before anything is written.
    keys[8] = "{t}:op:w:2";
    let bad = call(&redis, lua::SET, &keys, &["1000", "60000", "5", "1", "0", "6", "2", "0"]);
    assert!(matches!(bad, Resp::Error(e) if e.contains("BADVALUE")));
    let partial = call(&redis, lua::SET, &keys, &["1000", "60000", "5", "1"]);
    assert!(matches!(partial, Resp::Error(e) if e.contains("BADARGS")));
    assert_eq!(redis.command(&["GET", "{t}:seq"]).unwrap().as_str(), Some("4"));
    assert_eq!(redis.command(&["GETBIT", "{t}:bits", "5"]).unwrap(), Resp::Int(0));
}

/// Freezing inside a call: the item that unchecks a box checked too long
/// freezes it, and a later item of the same call finds it frozen.
#[test]
fn a_box_frozen_by_one_item_is_frozen_for_the_next() {
    let redis = RedisServer::start().unwrap();
    eval(&redis, lua::INIT, &BOARD_KEYS, &["1000", "0", "1", "77"]);
    let mut keys = BOARD_KEYS.to_vec();
    keys.push("{t}:op:w:1");
    let reply = eval(&redis, lua::SET, &keys, &["1000", "60000", "7", "1", "0"]);
    assert_eq!(answers(&reply), [[1, 1, 1]]);
    // The rule is about time: let more than freeze_after (1 ms) pass.
    std::thread::sleep(std::time::Duration::from_millis(5));
    keys[8] = "{t}:op:w:2";
    let args = ["1000", "60000", "7", "0", "0", "7", "0", "0", "8", "1", "0", "8", "0", "0"];
    let reply = eval(&redis, lua::SET, &keys, &args);
    // Box 8 is checked and unchecked in one call: checked for no time at all.
    assert_eq!(answers(&reply), [[-2, 1, 2], [-2, 1, 0], [1, 1, 3], [1, 0, 4]]);
    assert_eq!(redis.command(&["GET", "{t}:frozen_count"]).unwrap().as_str(), Some("1"));
    assert_eq!(redis.command(&["GET", "{t}:count"]).unwrap().as_str(), Some("1"));
    assert_eq!(redis.command(&["GETBIT", "{t}:frozen", "7"]).unwrap(), Resp::Int(1));
    assert_eq!(redis.command(&["ZCARD", "{t}:checked_at"]).unwrap(), Resp::Int(0));
}
