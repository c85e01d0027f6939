"""Error codes and reply texts, pinned to RabbitMQ's (3.10).

Channel errors (403, 404, 405, 406) close only the channel; connection errors (503, 530,
540) close the connection. Clients and operators grep for these texts, so they are
asserted exactly, Erlang terms in `invalid arg` errors included.
"""
import pika
import pytest
from pika.exceptions import ProbableAccessDeniedError

from amqp_helpers import channel_error, connection_error, get, sync

NF = "NOT_FOUND - no {kind} '{name}' in vhost '/'"


def check(err, code, text):
    assert (err.reply_code, err.reply_text) == (code, text)


# --- 404 NOT_FOUND -------------------------------------------------------------------

def test_404_passive_exchange(conn, name):
    err = channel_error(conn, lambda ch: ch.exchange_declare(name, passive=True))
    check(err, 404, NF.format(kind="exchange", name=name))


def test_404_publish_to_missing_exchange(conn, name):
    err = channel_error(conn, lambda ch: (ch.basic_publish(name, "k", b"x"), sync(ch)))
    check(err, 404, NF.format(kind="exchange", name=name))


@pytest.mark.parametrize("op", ["get", "consume", "purge", "bind"])
def test_404_missing_queue(conn, name, op):
    def fn(ch):
        if op == "get":
            ch.basic_get(name)
        elif op == "consume":
            ch.basic_consume(name, lambda *a: None)
        elif op == "purge":
            ch.queue_purge(name)
        else:
            ch.queue_bind(name, "amq.direct", "k")
    check(channel_error(conn, fn), 404, NF.format(kind="queue", name=name))


def test_404_bind_to_missing_exchange(conn, ch, name):
    ch.queue_declare(name)
    err = channel_error(conn, lambda c: c.queue_bind(name, name + "-missing", "k"))
    check(err, 404, NF.format(kind="exchange", name=name + "-missing"))


def test_deleting_missing_things_is_ok(ch, name):
    # RabbitMQ 3.x: queue.delete / exchange.delete / queue.unbind of missing things succeed
    assert ch.queue_delete(name).method.message_count == 0
    ch.exchange_delete(name)
    ch.queue_declare(name)
    ch.queue_unbind(name, "amq.direct", "never-bound")
    assert ch.is_open


def test_channel_error_leaves_connection_usable(conn, ch, name):
    channel_error(conn, lambda c: c.queue_declare(name, passive=True))
    ch.queue_declare(name)
    ch.basic_publish("", name, b"still works")
    assert get(ch, name)[2] == b"still works"


# --- 403 ACCESS_REFUSED ------------------------------------------------------------------

def test_403_reserved_names(conn):
    check(channel_error(conn, lambda ch: ch.queue_declare("amq.foo")), 403,
          "ACCESS_REFUSED - queue name 'amq.foo' contains reserved prefix 'amq.*'")
    check(channel_error(conn, lambda ch: ch.exchange_declare("amq.foo", "direct")), 403,
          "ACCESS_REFUSED - exchange name 'amq.foo' contains reserved prefix 'amq.*'")


def test_403_delete_system_exchange(conn):
    check(channel_error(conn, lambda ch: ch.exchange_delete("amq.direct")), 403,
          "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed")


def test_403_bind_to_default_exchange(conn, ch, name):
    ch.queue_declare(name)
    check(channel_error(conn, lambda c: c.queue_bind(name, "", name)), 403,
          "ACCESS_REFUSED - operation not permitted on the default exchange")


def test_403_publish_to_internal_exchange(conn, ch, name):
    ch.exchange_declare(name, "direct", internal=True)
    check(channel_error(conn, lambda c: (c.basic_publish(name, "k", b"x"), sync(c))), 403,
          f"ACCESS_REFUSED - cannot publish to internal exchange '{name}' in vhost '/'")


@pytest.mark.parametrize("exclusive_first", [True, False])
def test_403_exclusive_consumer(conn, ch, name, exclusive_first):
    ch.queue_declare(name)
    ch.basic_consume(name, lambda *a: None, exclusive=exclusive_first)
    err = channel_error(conn, lambda c: c.basic_consume(name, lambda *a: None, exclusive=not exclusive_first))
    check(err, 403, f"ACCESS_REFUSED - queue '{name}' in vhost '/' in exclusive use")


# --- 405 RESOURCE_LOCKED -----------------------------------------------------------------

LOCKED = ("RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{}' in vhost '/'. "
          "It could be originally declared on another connection or the exclusive property value "
          "does not match that of the original declaration.")


@pytest.mark.parametrize("op", ["declare", "passive", "consume", "get", "bind", "purge", "delete"])
def test_405_exclusive_queue_of_another_connection(broker, ch, name, op):
    ch.queue_declare(name, exclusive=True)
    other = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        def fn(c):
            {"declare": lambda: c.queue_declare(name),
             "passive": lambda: c.queue_declare(name, passive=True),
             "consume": lambda: c.basic_consume(name, lambda *a: None),
             "get": lambda: c.basic_get(name),
             "bind": lambda: c.queue_bind(name, "amq.fanout"),
             "purge": lambda: c.queue_purge(name),
             "delete": lambda: c.queue_delete(name)}[op]()
        check(channel_error(other, fn), 405, LOCKED.format(name))
    finally:
        other.close()
    assert ch.queue_declare(name, passive=True).method.queue == name, "still there for its owner"


def test_405_redeclare_shared_queue_as_exclusive(conn, ch, name):
    ch.queue_declare(name)
    check(channel_error(conn, lambda c: c.queue_declare(name, exclusive=True)), 405, LOCKED.format(name))


@pytest.mark.parametrize("second", [dict(exclusive=False), dict(exclusive=False, durable=True)])
def test_405_redeclare_exclusive_queue_as_shared(conn, ch, name, second):
    # exclusivity is compared before durable, either way round a 405
    ch.queue_declare(name, exclusive=True)
    check(channel_error(conn, lambda c: c.queue_declare(name, **second)), 405, LOCKED.format(name))


def test_exclusive_queue_is_never_durable(ch, name):
    # RabbitMQ declares it non-durable whatever was asked, so either flag re-declares it
    ch.queue_declare(name, exclusive=True, durable=True)
    ch.queue_declare(name, exclusive=True)
    ch.queue_declare(name, exclusive=True, durable=True)


# --- 406 PRECONDITION_FAILED -------------------------------------------------------------

@pytest.mark.parametrize("expiration,why", [
    ("abc", "no_integer"),
    ("-1", "{value_negative,-1}"),
    ("1.5", '{leftover_string,".5"}'),
])
def test_406_invalid_expiration(conn, name, expiration, why):
    err = channel_error(conn, lambda ch: (
        ch.basic_publish("", name, b"x", pika.BasicProperties(expiration=expiration)), sync(ch)))
    check(err, 406, f"PRECONDITION_FAILED - invalid expiration '{expiration}': {why}")


def test_406_inequivalent_queue_args(conn, ch, name):
    ch.queue_declare(name + "-ad")
    check(channel_error(conn, lambda c: c.queue_declare(name + "-ad", auto_delete=True)), 406,
          f"PRECONDITION_FAILED - inequivalent arg 'auto_delete' for queue '{name}-ad' in vhost '/': "
          "received 'true' but current is 'false'")
    ch.queue_declare(name + "-ttl", arguments={"x-message-ttl": 100})
    check(channel_error(conn, lambda c: c.queue_declare(name + "-ttl", arguments={"x-message-ttl": 200})), 406,
          f"PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue '{name}-ttl' in vhost '/': "
          "received '200' but current is '100'")
    ch.queue_declare(name + "-none")
    check(channel_error(conn, lambda c: c.queue_declare(name + "-none", arguments={"x-message-ttl": 200})), 406,
          f"PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue '{name}-none' in vhost '/': "
          "received the value '200' of type 'signedint' but current is none")


def test_406_inequivalent_exchange_durable(conn, ch, name):
    ch.exchange_declare(name, "direct")
    check(channel_error(conn, lambda c: c.exchange_declare(name, "direct", durable=True)), 406,
          f"PRECONDITION_FAILED - inequivalent arg 'durable' for exchange '{name}' in vhost '/': "
          "received 'true' but current is 'false'")


@pytest.mark.parametrize("args,detail", [
    ({"x-message-ttl": -1}, "invalid arg 'x-message-ttl' for queue '{q}' in vhost '/': {{value_negative,-1}}"),
    ({"x-message-ttl": "abc"}, "invalid arg 'x-message-ttl' for queue '{q}' in vhost '/': \"expected integer, got longstr\""),
    ({"x-max-length": True}, "invalid arg 'x-max-length' for queue '{q}' in vhost '/': \"expected integer, got bool\""),
    ({"x-overflow": "nope"}, "invalid arg 'x-overflow' for queue '{q}' in vhost '/': invalid_overflow"),
    ({"x-max-priority": 300}, "invalid arg 'x-max-priority' for queue '{q}' in vhost '/': {{max_value_exceeded,300}}"),
    ({"x-max-length": -1}, "invalid arg 'x-max-length' for queue '{q}' in vhost '/': {{value_negative,-1}}"),
    ({"x-expires": 0}, "invalid arg 'x-expires' for queue '{q}' in vhost '/': {{value_zero,0}}"),
    ({"x-single-active-consumer": "yes"}, "invalid arg 'x-single-active-consumer' for queue '{q}' in vhost '/': {{unacceptable_type,longstr}}"),
    ({"x-dead-letter-exchange": 5}, "invalid type 'signedint' for arg 'x-dead-letter-exchange' in queue '{q}' in vhost '/'"),
    ({"x-queue-mode": "weird"}, "invalid arg 'x-queue-mode' for queue '{q}' in vhost '/': \"unsupported queue mode 'weird'\""),
    ({"x-queue-version": 3}, "invalid arg 'x-queue-version' for queue '{q}' in vhost '/': \"unsupported queue version '3'\""),
    ({"x-delivery-limit": 5}, "invalid arg 'x-delivery-limit' for queue '{q}' in vhost '/' of queue type rabbit_classic_queue"),
    ({"x-queue-type": "quorum", "x-max-priority": 5}, "invalid arg 'x-max-priority' for queue '{q}' in vhost '/' of queue type rabbit_quorum_queue"),
    ({"x-queue-type": "bogus"}, "invalid arg 'x-queue-type' for queue '{q}' in vhost '/': \"unsupported queue type 'bogus'\""),
])
def test_406_invalid_queue_args(conn, name, args, detail):
    err = channel_error(conn, lambda c: c.queue_declare(name, durable=True, arguments=args))
    check(err, 406, "PRECONDITION_FAILED - " + detail.format(q=name))


def test_406_inequivalent_alternate_exchange(conn, ch, name):
    # The one exchange argument RabbitMQ compares on a re-declaration.
    ch.exchange_declare(name, "direct", arguments={"alternate-exchange": "ae1"})
    ch.exchange_declare(name, "direct", arguments={"alternate-exchange": "ae1", "x-other": 1})
    pre = f"PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange '{name}' in vhost '/': "
    check(channel_error(conn, lambda c: c.exchange_declare(name, "direct", arguments={"alternate-exchange": "ae2"})),
          406, pre + "received 'ae2' but current is 'ae1'")
    check(channel_error(conn, lambda c: c.exchange_declare(name, "direct")),
          406, pre + "received none but current is the value 'ae1' of type 'longstr'")


def test_406_headers_binding_with_a_bad_x_match(conn, ch, name):
    ch.exchange_declare(name, "headers")
    ch.queue_declare(name)
    ch.queue_bind(name, name, "", arguments={"x-match": "any-with-x", "a": 1})
    check(channel_error(conn, lambda c: c.queue_bind(name, name, "", arguments={"x-match": "bogus", "a": 1})), 406,
          'PRECONDITION_FAILED - Invalid x-match field value <<"bogus">>; expected all, any, all-with-x, or any-with-x')


def test_406_consumer_priority_of_the_wrong_type(conn, ch, name):
    ch.queue_declare(name)
    check(channel_error(conn, lambda c: c.basic_consume(name, lambda *a: None, arguments={"x-priority": "high"})), 406,
          f"PRECONDITION_FAILED - invalid arg 'x-priority' for queue '{name}' in vhost '/': \"expected integer, got longstr\"")


def test_direct_reply_to_passive_declare(ch):
    ok = ch.queue_declare("amq.rabbitmq.reply-to", passive=True).method
    assert (ok.queue, ok.message_count, ok.consumer_count) == ("amq.rabbitmq.reply-to", 0, 1)


def test_406_unknown_delivery_tag(conn, ch, name):
    check(channel_error(conn, lambda c: (c.basic_ack(42), sync(c))), 406,
          "PRECONDITION_FAILED - unknown delivery tag 42")
    ch.queue_declare(name)
    ch.basic_publish("", name, b"x")

    def double_ack(c):
        m, _, _ = get(c, name, auto_ack=False)
        c.basic_ack(m.delivery_tag)
        c.basic_ack(m.delivery_tag)
        sync(c)
    check(channel_error(conn, double_ack), 406, "PRECONDITION_FAILED - unknown delivery tag 1")

    # multiple=true needs the tag itself outstanding: acking up to a tag past the last
    # delivery is refused, and the earlier ones stay unacknowledged (Bunny's spec).
    ch.basic_publish("", name, b"y")

    def ack_past_the_end(c):
        m, _, _ = get(c, name, auto_ack=False)
        c.basic_ack(m.delivery_tag + 81, multiple=True)
        sync(c)
    check(channel_error(conn, ack_past_the_end), 406, "PRECONDITION_FAILED - unknown delivery tag 82")
    assert ch.queue_declare(name, passive=True).method.message_count == 1


def test_406_user_id_mismatch(conn, ch, name):
    ch.queue_declare(name)
    ch.basic_publish("", name, b"ok", pika.BasicProperties(user_id="guest"))  # matching: fine
    assert get(ch, name)[1].user_id == "guest"
    check(channel_error(conn, lambda c: (c.basic_publish("", name, b"x", pika.BasicProperties(user_id="bob")), sync(c))),
          406, "PRECONDITION_FAILED - user_id property set to 'bob' but authenticated user was 'guest'")


def test_406_tx_and_confirm_exclude_each_other(conn):
    check(channel_error(conn, lambda c: (c.tx_select(), c.confirm_delivery())), 406,
          "PRECONDITION_FAILED - cannot switch from tx to confirm mode")
    check(channel_error(conn, lambda c: (c.confirm_delivery(), c.tx_select())), 406,
          "PRECONDITION_FAILED - cannot switch from confirm to tx mode")
    check(channel_error(conn, lambda c: c.tx_commit()), 406, "PRECONDITION_FAILED - channel is not transactional")
    check(channel_error(conn, lambda c: c.tx_rollback()), 406, "PRECONDITION_FAILED - channel is not transactional")


def test_406_exchange_delete_if_unused(conn, ch, name):
    ch.exchange_declare(name, "direct")
    ch.queue_declare(name)
    ch.queue_bind(name, name, "k")
    check(channel_error(conn, lambda c: c.exchange_delete(name, if_unused=True)), 406,
          f"PRECONDITION_FAILED - exchange '{name}' in vhost '/' in use")
    ch.queue_unbind(name, name, "k")
    ch.exchange_delete(name, if_unused=True)


def test_406_direct_reply_to_misuse(conn, name):
    check(channel_error(conn, lambda c: c.basic_consume("amq.rabbitmq.reply-to", lambda *a: None)), 406,
          "PRECONDITION_FAILED - reply consumer cannot acknowledge")
    check(channel_error(conn, lambda c: (c.basic_publish("", name, b"x", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to")), sync(c))),
          406, "PRECONDITION_FAILED - fast reply consumer does not exist")


# --- connection errors ---------------------------------------------------------------------

def test_503_unknown_exchange_type(broker, name):
    err = connection_error(broker.url, lambda c: c.exchange_declare(name, "nonsense"))
    check(err, 503, "COMMAND_INVALID - unknown exchange type 'nonsense'")
    # A name that is an Erlang atom is "invalid" in RabbitMQ's words (amqp-client.js
    # tests declare type 'none').
    err = connection_error(broker.url, lambda c: c.exchange_declare(name, "none"))
    check(err, 503, "COMMAND_INVALID - invalid exchange type 'none'")


def test_540_prefetch_size(broker):
    err = connection_error(broker.url, lambda c: c.basic_qos(prefetch_size=4096, prefetch_count=1))
    check(err, 540, "NOT_IMPLEMENTED - prefetch_size!=0 (4096)")


def test_540_recover_without_requeue(broker):
    err = connection_error(broker.url, lambda c: c.basic_recover(requeue=False))
    check(err, 540, "NOT_IMPLEMENTED - requeue=false")


def test_530_unknown_vhost(broker):
    url = broker.url.rsplit("/", 1)[0] + "/no-such-vhost"
    with pytest.raises(ProbableAccessDeniedError) as e:
        pika.BlockingConnection(pika.URLParameters(url))
    assert "(530) 'NOT_ALLOWED - vhost no-such-vhost not found'" in str(e.value)
