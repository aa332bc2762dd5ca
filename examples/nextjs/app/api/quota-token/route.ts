// Mints a short-lived, read-only quotawatch token for the browser, with the
// service key, which never leaves the server. The page's client library
// calls this route for its first token, before the token expires, and when
// quotawatch refuses it.

// How long a token lives, in seconds; the client library renews it before then.
const TOKEN_LIFETIME_SECONDS = 900;

/** Tells the browser only that there is no token; the reason goes to the server's log. */
function noToken(reason: string, status: number): Response {
  console.error(`quota-token: ${reason}`);
  return Response.json({ error: "no quota token" }, { status });
}

export async function POST(): Promise<Response> {
  // A real app takes the workspace from its own session (the signed-in
  // user's tenant) and refuses a request without one; the example serves
  // the one workspace its environment names.
  const workspace = process.env.QUOTAWATCH_WORKSPACE;
  const quotawatchUrl = process.env.QUOTAWATCH_URL;
  const serviceKey = process.env.QUOTAWATCH_SERVICE_KEY;
  if (!workspace || !quotawatchUrl || !serviceKey) {
    return noToken(
      "set QUOTAWATCH_URL, QUOTAWATCH_SERVICE_KEY and QUOTAWATCH_WORKSPACE",
      500,
    );
  }
  let answer: Response;
  try {
    answer = await fetch(`${quotawatchUrl.replace(/\/+$/, "")}/api/tokens`, {
      method: "POST",
      headers: {
        Authorization: `Bearer ${serviceKey}`,
        "Content-Type": "application/json",
      },
      body: JSON.stringify({ workspace, expires_in: TOKEN_LIFETIME_SECONDS }),
      cache: "no-store",
    });
  } catch (error) {
    return noToken(`quotawatch is unreachable: ${error}`, 502);
  }
  if (!answer.ok) {
    return noToken(
      `quotawatch answered HTTP ${answer.status}: ${await answer.text()}`,
      502,
    );
  }
  const { token, expires_at: expiresAt } = (await answer.json()) as {
    token: string;
    expires_at: string;
  };
  return Response.json(
    { token, expiresAt },
    { headers: { "Cache-Control": "no-store" } },
  );
}
