"""A test SMTP server for setpoint-email's tests, on aiosmtpd.

Stores every accepted message in a Maildir and behaves by the recipient's local part:

  reject550-*   RCPT TO is refused with 550 (permanent)
  defer451-*    RCPT TO is refused with 451 (transient), every time
  flaky451-*    RCPT TO is refused with 451 the first time per address, then accepted
  slowdown-*    RCPT TO is refused with "421 ... slow down" and the connection closed, the first
                time per address, then accepted
  hangup-*      the connection is dropped without a reply to RCPT TO, the first time per
                address, then accepted
  data554-*     the message data is refused with 554 after it was sent
  rate451-*     the message data is refused with "451 4.7.0 rate limit exceeded" the first time
                per address, then accepted
  vanish-*      the message is stored, then the connection is dropped before the reply

Options: --port (0 picks a free one), --auth USER:PASSWORD (AUTH required, PLAIN and LOGIN
over plain text), --mechanisms PLAIN,LOGIN (offer only these), --tls-cert/--tls-key (offer and
require STARTTLS; with --implicit-tls, TLS from the first byte instead). Prints "PORT <n>" on
stdout once it listens.
"""

import argparse
import asyncio
import ssl
import sys

from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Handler(Mailbox):
    def __init__(self, maildir):
        super().__init__(maildir)
        self.deferred = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0]
        if local.startswith("reject550"):
            return "550 5.1.1 <%s>: mailbox unavailable" % address
        if local.startswith("defer451"):
            return "451 4.3.0 <%s>: try again later" % address
        if local.startswith("flaky451") and address not in self.deferred:
            self.deferred.add(address)
            return "451 4.3.0 <%s>: greylisted, try again later" % address
        if local.startswith("slowdown") and address not in self.deferred:
            self.deferred.add(address)
            # 421 closes the channel: close once the reply is written.
            asyncio.get_running_loop().call_soon(server.transport.close)
            return "421 4.7.0 smtp.test: too many messages from you, slow down"
        if local.startswith("hangup") and address not in self.deferred:
            self.deferred.add(address)
            server.transport.abort()
            return "250 2.1.5 OK (never seen: the connection is gone)"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        locals_ = [a.split("@", 1)[0] for a in envelope.rcpt_tos]
        if any(l.startswith("data554") for l in locals_):
            return "554 5.6.0 message content rejected"
        limited = [a for a in envelope.rcpt_tos if a.startswith("rate451")]
        if limited and limited[0] not in self.deferred:
            self.deferred.add(limited[0])
            return "451 4.7.0 rate limit exceeded, try again later"
        reply = await super().handle_DATA(server, session, envelope)
        if any(l.startswith("vanish") for l in locals_):
            server.transport.abort()
        return "250 2.0.0 OK queued" if reply.startswith("250") else reply


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--maildir", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--auth")
    p.add_argument("--mechanisms")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--implicit-tls", action="store_true")
    a = p.parse_args()

    handler = Handler(a.maildir)
    kwargs = {"hostname": "smtp.test"}
    if a.auth:
        user, password = a.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login == user.encode()
                and auth_data.password == password.encode()
            )
            return AuthResult(success=ok, handled=False)

        kwargs.update(authenticator=authenticator, auth_required=True, auth_require_tls=False)
        if a.mechanisms:
            offered = set(a.mechanisms.upper().split(","))
            kwargs["auth_exclude_mechanism"] = [m for m in ("PLAIN", "LOGIN") if m not in offered]
    ctx = None
    if a.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(a.tls_cert, a.tls_key)
        if not a.implicit_tls:
            kwargs.update(tls_context=ctx, require_starttls=True)

    server_ssl = ctx if a.tls_cert and a.implicit_tls else None
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(lambda: SMTP(handler, **kwargs), host="127.0.0.1", port=a.port, ssl=server_ssl)
    )
    print("PORT", server.sockets[0].getsockname()[1], flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
