"""An SMTP receiver for quotawatch's mail tests (run by tests/it/mail.rs).

Listens on 127.0.0.1 on a port the system picks, prints `READY <port>`, then
one JSON line per message received: the envelope, the headers and the
decoded parts by content type, the user
that authenticated and whether the session was encrypted. Options:

  --reply "451 4.3.0 Try later"   answer every message's data with this reply
  --times N                       ... only the first N messages, then accept
  --tls CERT KEY                  offer STARTTLS with this certificate, and
                                  refuse mail before it
  --login USER:PASSWORD           require authentication with these
"""

import argparse
import asyncio
import email
import email.policy
import json
import logging
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Recorder:
    def __init__(self, reply, times):
        self.reply = reply
        self.times = times

    async def handle_DATA(self, server, session, envelope):
        if self.reply and (self.times is None or self.times > 0):
            if self.times is not None:
                self.times -= 1
            # Announced, so that a test can count the refusals.
            print(json.dumps({"refused": self.reply}), flush=True)
            return self.reply
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        parts = {
            part.get_content_type(): part.get_content()
            for part in message.walk()
            if not part.is_multipart()
        }
        print(
            json.dumps(
                {
                    "mail_from": envelope.mail_from,
                    "rcpt_tos": envelope.rcpt_tos,
                    "from": str(message["from"]),
                    "to": str(message["to"]),
                    "subject": str(message["subject"]),
                    "content_type": message.get_content_type(),
                    "parts": parts,
                    "login": session.auth_data.decode() if isinstance(session.auth_data, bytes) else None,
                    "encrypted": session.ssl is not None,
                }
            ),
            flush=True,
        )
        return "250 OK"


def authenticator(expected_user, expected_password):
    def check(server, session, envelope, mechanism, auth_data):
        if (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == expected_user
            and auth_data.password.decode() == expected_password
        ):
            return AuthResult(success=True, auth_data=auth_data.login)
        return AuthResult(success=False, handled=False)

    return check


async def main():
    # aiosmtpd logs a warning about its own deprecated field whenever a login
    # succeeds; only errors are worth reading here.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--reply")
    parser.add_argument("--times", type=int)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--login")
    args = parser.parse_args()

    options = {}
    if args.tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*args.tls)
        options.update(tls_context=context, require_starttls=True)
    if args.login:
        user, password = args.login.split(":", 1)
        options.update(authenticator=authenticator(user, password), auth_required=True)

    handler = Recorder(args.reply, args.times)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="localhost", **options), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    # Runs until the test ends it; stdin closing (the test gone) ends it too.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()
    server.close()


asyncio.run(main())
