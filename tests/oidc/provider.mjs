// A real, OpenID-certified provider (panva/oidc-provider) for oauth_sidecar's tests.
//
// Loopback only, plain http, in-memory storage, a fresh RS256 key on every start: NEVER use this
// outside tests. Usage (every option also reads an environment variable, see OPTIONS below):
//
//   node tests/oidc/provider.mjs --port 0 --issuer-path /realms/demo
//
// Prints exactly one JSON line to stdout once listening, e.g.
//   {"issuer":"http://127.0.0.1:40123/realms/demo","port":40123}
// and nothing else on stdout (diagnostics go to stderr), so a parent can read the line and then
// stop reading without ever blocking this process. Exits 0 on SIGTERM/SIGINT, and with
// --exit-on-stdin-close also when its stdin closes (no orphan if the parent dies hard).
//
// What it serves (all under the issuer, whose path may be empty or Keycloak-style):
//   /.well-known/openid-configuration (also as /.well-known/oauth-authorization-server under the
//   issuer), the jwks_uri, /token, /auth, /me, /reg, ...
//   client_credentials: a confidential client (client_secret_basic or _post) gets, for
//     `resource=<absolute URL>`, a JWT access token (typ at+jwt, RS256) with aud = that resource
//     and the requested scopes among --scopes (an opaque one with --access-token-format opaque).
//     The --scopes are also listed in the discovery document's scopes_supported (with openid and
//     offline_access), so clients may register and ask for them.
//   authorization_code + PKCE (S256, required for every client): with --auto-login <account>
//     every interaction is answered at once — login as <account>, consent to everything asked —
//     so a test can follow redirects from /auth to the redirect_uri with no browser. The
//     confidential client and a public (token_endpoint_auth_method none, native) client may use
//     it; their redirect_uris default to http://127.0.0.1/callback, and loopback redirect URIs of
//     native clients match any port (RFC 8252 §7.3). A client following the redirects must keep
//     cookies for an IP host (aiohttp: CookieJar(unsafe=True)) and resolve the relative Location
//     of the interaction redirect. The token request may omit `resource` (the granted one is
//     used). Without --auto-login the interaction URL answers 501: there is no login UI.
//   Dynamic Client Registration (RFC 7591, OpenID Registration): open, no initial access token,
//     at the registration_endpoint of the discovery document (<issuer>/reg), so an MCP client
//     can register itself. PKCE stays required for every client, registered ones included.
//   Refresh tokens: issued when the grant includes `offline_access` (the MCP SDK asks for it
//     when scopes_supported lists it, with prompt=consent) and the client may use refresh_token.
//     A refresh with `resource` yields again an access token (of --access-token-format) for that
//     resource. Refresh tokens are always opaque and are not rotated for confidential clients.
//   RFC 9207: every authorization response carries `iss` (oidc-provider always sends it and
//     advertises authorization_response_iss_parameter_supported: true).
//   --static-client <id>:<secret>:<redirect_uri>[,<redirect_uri>...] (repeatable; environment:
//     OIDC_STATIC_CLIENTS, whitespace-separated) pre-registers a confidential web client
//     (client_secret_basic, authorization_code + refresh_token + client_credentials) with
//     exactly these redirect URIs, e.g. a proxy's http://127.0.0.1:<port>/oauth/callback.
//     The id and the secret must not contain ':'; the redirect URIs must not contain ','.
//   --access-token-ttl <seconds> (OIDC_ACCESS_TOKEN_TTL, default 300): lifetime of every access
//     token, JWT or opaque (the resource server's accessTokenTTL and ttl.AccessToken and
//     ttl.ClientCredentials all use it).
//   --access-token-format jwt|opaque (OIDC_ACCESS_TOKEN_FORMAT, default jwt): the format of every
//     access token for a resource (client_credentials, authorization_code, refresh_token grants;
//     oidc-provider takes it from the resource server's `accessTokenFormat`). opaque: a random
//     reference string (43 base64url characters, not a JWS) that only the introspection
//     endpoint can explain; its lifetime, audience (= the resource) and scopes are the same.
//   --jwt-resource <url> (repeatable; environment: OIDC_JWT_RESOURCES, whitespace-separated):
//     access tokens for exactly this resource are JWTs whatever --access-token-format says, so
//     one provider issues both kinds, as Auth0 does (a JWT for an API audience, opaque
//     otherwise): what a resource server in TOKEN_VALIDATION=auto must tell apart.
//   --client-credentials-sub client_id|none (OIDC_CLIENT_CREDENTIALS_SUB, default client_id):
//     oidc-provider introspects an opaque client_credentials token WITHOUT `sub` (there is no
//     account); by default this provider adds sub = the client's id, as its own JWT access
//     tokens (and ORY Hydra and Okta) do, so a subject allow-list works the same with either
//     format. `none` keeps oidc-provider's answer without `sub`.
//   Token introspection (RFC 7662) at <issuer>/token/introspection and revocation (RFC 7009) at
//     <issuer>/token/revocation are always on (both listed in the discovery document). Only
//     opaque tokens and refresh tokens can be introspected or revoked: oidc-provider answers
//     400 unsupported_token_type for a JWT. Who may see what:
//       introspection: an --introspection-client sees every token; any other confidential
//         client only the tokens issued to itself; anyone else gets {"active": false}.
//       revocation: the client the token was issued to, or an --introspection-client (an
//         administrator's revocation); any other client is refused (400 invalid_request).
//         Revoking a refresh token or an authorization_code access token revokes the whole grant
//         (every token issued with it); a client_credentials token only itself.
//     The answers (oidc-provider's, exactly; members in this order):
//       access token: {"active":true,"sub":…,"client_id":…,"exp":…,"iat":…,"iss":<issuer>,
//         "aud":<the resource, a string>,"scope":"mcp:read","token_type":"Bearer"}
//         (sub is the account for authorization_code, see --client-credentials-sub otherwise)
//       refresh token: {"active":true,"sub":…,"client_id":…,"exp":…,"iat":…,"iss":<issuer>,
//         "scope":"openid offline_access mcp:read"}: no aud and no token_type
//       revoked, expired, unknown, or not to be shown to this client: {"active":false}
//       bad client credentials: 401 {"error":"invalid_client",…}
//   --introspection-client <id>:<secret>[:<auth_method>] (repeatable; environment:
//     OIDC_INTROSPECTION_CLIENTS, whitespace-separated) registers a confidential client with no
//     grant at all, only allowed to introspect and revoke, as a resource server's own
//     credentials; <auth_method> (client_secret_basic by default, or client_secret_post) is
//     what it is registered with, but oidc-provider accepts either secret method from it; a
//     wrong secret answers 401 invalid_client. The id and the secret must not contain ':'.
//   --jwt-introspection (OIDC_JWT_INTROSPECTION=1): RFC 9701 signed introspection answers. The
//     discovery document lists introspection_signing_alg_values_supported ["RS256"], and every
//     client (oidc-provider's default introspection_signed_response_alg is RS256) that asks with
//     `Accept: application/token-introspection+jwt` is answered with that content type: a JWS
//     (typ token-introspection+jwt, the provider's RS256 key from the jwks_uri, no exp) whose
//     claims are iss = the issuer, aud = the introspecting client's id, iat, and
//     token_introspection = the JSON answer. Without that Accept the answer stays plain JSON.
//   Test control of the introspection endpoint, at the server's root whatever the issuer path
//   (oidc-provider has no route there): GET /_test/introspection answers
//     {"requests": <introspection requests received>, "revocations": <revocation requests>,
//      "delay_ms": <n>, "fail_status": <n>}
//   counting every request that reached the endpoint whatever its answer (so a test can prove
//   that a resource server's cache spared the provider a call); POST
//   /_test/introspection?delay_ms=<n>&fail_status=<n> sets them for the requests that follow:
//   each introspection request is held <n> ms before oidc-provider handles it (a slow IdP), and
//   with fail_status (100..599, 0 = off) answered at once with that status and
//   {"error":"temporarily_unavailable"} instead (a broken IdP). Omitted parameters keep their
//   value; the answer is the state after the change.
//
// oidc-provider 9 officially supports Node 22 LTS and later; it runs on Node 20 but prints an
// "Unsupported runtime" warning to stderr.

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const OPTIONS = {
  port: { type: 'string', env: 'OIDC_PORT', default: '0' },
  'issuer-path': { type: 'string', env: 'OIDC_ISSUER_PATH', default: '' },
  'client-id': { type: 'string', env: 'OIDC_CLIENT_ID', default: 'sidecar-test' },
  'client-secret': { type: 'string', env: 'OIDC_CLIENT_SECRET', default: 'sidecar-secret' },
  'public-client-id': { type: 'string', env: 'OIDC_PUBLIC_CLIENT_ID', default: 'sidecar-public' },
  'redirect-uri': { type: 'string', env: 'OIDC_REDIRECT_URI', default: 'http://127.0.0.1/callback' },
  scopes: { type: 'string', env: 'OIDC_SCOPES', default: 'mcp:read mcp:write' },
  'access-token-ttl': { type: 'string', env: 'OIDC_ACCESS_TOKEN_TTL', default: '300' },
  'auto-login': { type: 'string', env: 'OIDC_AUTO_LOGIN', default: '' },
  'static-client': { type: 'string', multiple: true, env: 'OIDC_STATIC_CLIENTS', default: [] },
  'access-token-format': { type: 'string', env: 'OIDC_ACCESS_TOKEN_FORMAT', default: 'jwt' },
  'jwt-resource': { type: 'string', multiple: true, env: 'OIDC_JWT_RESOURCES', default: [] },
  'introspection-client': {
    type: 'string', multiple: true, env: 'OIDC_INTROSPECTION_CLIENTS', default: [],
  },
  'jwt-introspection': { type: 'boolean', env: 'OIDC_JWT_INTROSPECTION', default: false },
  'client-credentials-sub': { type: 'string', env: 'OIDC_CLIENT_CREDENTIALS_SUB', default: 'client_id' },
  'exit-on-stdin-close': { type: 'boolean', env: 'OIDC_EXIT_ON_STDIN_CLOSE', default: false },
};

function options() {
  const { values } = parseArgs({
    options: Object.fromEntries(
      Object.entries(OPTIONS).map(([k, { type, multiple }]) => [k, { type, multiple: !!multiple }]),
    ),
    strict: true,
    allowPositionals: false,
  });
  const result = {};
  for (const [name, { type, multiple, env, default: fallback }] of Object.entries(OPTIONS)) {
    let value = values[name];
    if (value === undefined && process.env[env] !== undefined && process.env[env] !== '') {
      if (multiple) value = process.env[env].split(/\s+/).filter(Boolean);
      else value = type === 'boolean' ? /^(1|true|yes|on)$/i.test(process.env[env]) : process.env[env];
    }
    result[name] = value ?? fallback;
  }
  const port = Number(result.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`--port ${result.port} is not a port number (0 picks a free one)`);
  }
  let issuerPath = result['issuer-path'].replace(/\/+$/, '');
  if (issuerPath && !issuerPath.startsWith('/')) issuerPath = `/${issuerPath}`;
  if (/[?#]/.test(issuerPath)) throw new Error('--issuer-path must not contain ? or #');
  const ttl = Number(result['access-token-ttl']);
  if (!Number.isInteger(ttl) || ttl < 1) throw new Error('--access-token-ttl must be seconds > 0');
  const accessTokenFormat = result['access-token-format'];
  if (!['jwt', 'opaque'].includes(accessTokenFormat)) {
    throw new Error(`--access-token-format ${JSON.stringify(accessTokenFormat)} is not jwt or opaque`);
  }
  if (!['client_id', 'none'].includes(result['client-credentials-sub'])) {
    throw new Error('--client-credentials-sub must be client_id or none');
  }
  return {
    ...result,
    port,
    issuerPath,
    ttl,
    accessTokenFormat,
    scopes: result.scopes.split(/[\s,]+/).filter(Boolean),
    staticClients: result['static-client'].map(staticClient),
    introspectionClients: result['introspection-client'].map(introspectionClient),
    jwtResources: new Set(result['jwt-resource'].map(jwtResource)),
  };
}

function jwtResource(url) {
  if (!URL.canParse(url)) throw new Error(`--jwt-resource ${JSON.stringify(url)} is not a URL`);
  return url;
}

const INTROSPECTION_AUTH_METHODS = ['client_secret_basic', 'client_secret_post'];

// "<id>:<secret>[:<auth_method>]": a resource server's credentials, good for nothing but
// introspection and revocation (no grant type, no redirect URI).
function introspectionClient(spec) {
  const [clientId, secret, authMethod = 'client_secret_basic', ...rest] = spec.split(':');
  if (!clientId || !secret || rest.length > 0) {
    throw new Error(`--introspection-client ${JSON.stringify(spec)} is not <id>:<secret>[:<auth_method>]`);
  }
  if (!INTROSPECTION_AUTH_METHODS.includes(authMethod)) {
    throw new Error(`--introspection-client auth method ${JSON.stringify(authMethod)} is not one of ${INTROSPECTION_AUTH_METHODS.join(', ')}`);
  }
  return {
    client_id: clientId,
    client_secret: secret,
    grant_types: [],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: authMethod,
  };
}

// "<id>:<secret>:<uri>[,<uri>...]": the URIs contain ':' themselves, so split at the first two.
function staticClient(spec) {
  const first = spec.indexOf(':');
  const second = first < 0 ? -1 : spec.indexOf(':', first + 1);
  const clientId = spec.slice(0, first);
  const secret = spec.slice(first + 1, second);
  const redirectUris = spec.slice(second + 1).split(',').filter(Boolean);
  if (second < 0 || !clientId || !secret || redirectUris.length === 0) {
    throw new Error(`--static-client ${JSON.stringify(spec)} is not <id>:<secret>:<redirect_uri>[,...]`);
  }
  for (const uri of redirectUris) {
    if (!URL.canParse(uri)) throw new Error(`--static-client redirect URI ${JSON.stringify(uri)} is not a URL`);
  }
  return {
    client_id: clientId,
    client_secret: secret,
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
    response_types: ['code'],
    redirect_uris: redirectUris,
    token_endpoint_auth_method: 'client_secret_basic',
  };
}

function signingJwks() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { keys: [{ ...jwk, kid: `rs256-${crypto.randomBytes(4).toString('hex')}`, alg: 'RS256', use: 'sig' }] };
}

function configuration(opts) {
  const grantTypes = ['client_credentials', 'authorization_code', 'refresh_token'];
  const introspectors = new Set(opts.introspectionClients.map(({ client_id: id }) => id));
  return {
    jwks: signingJwks(),
    clients: [
      {
        client_id: opts['client-id'],
        client_secret: opts['client-secret'],
        grant_types: grantTypes,
        response_types: ['code'],
        redirect_uris: [opts['redirect-uri']],
        token_endpoint_auth_method: 'client_secret_basic',
      },
      {
        client_id: opts['public-client-id'],
        application_type: 'native',
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        redirect_uris: [opts['redirect-uri']],
        token_endpoint_auth_method: 'none',
      },
      ...opts.staticClients,
      ...opts.introspectionClients,
    ],
    clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'none'],
    // The resource's scopes are also Authorization Server scopes, so they are in scopes_supported
    // and a client may register with them: the MCP SDK registers with the scope it is about to
    // request (the challenge's, else the PRM's, else these), and oidc-provider refuses
    // registration scopes it does not know (invalid_client_metadata).
    scopes: ['openid', 'offline_access', ...opts.scopes],
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    pkce: { required: () => true },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // RFC 7662 §2.1: the endpoint must know who may learn about which token. Public
        // clients never get here with an answer (see the header).
        allowedPolicy: (_ctx, client, token) => introspectors.has(client.clientId)
          || (client.clientAuthMethod !== 'none' && client.clientId === token.clientId),
      },
      jwtIntrospection: { enabled: opts['jwt-introspection'] },
      revocation: {
        enabled: true,
        // RFC 7009 §2.1: the token's own client, or a resource server acting as administrator.
        allowedPolicy: (_ctx, client, token) => {
          if (introspectors.has(client.clientId) || client.clientId === token.clientId) return true;
          throw new errors.InvalidRequest('client is not authorized to revoke the presented token');
        },
      },
      // Open Dynamic Client Registration, as MCP clients expect (RFC 7591).
      registration: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // RFC 8707: the token's audience is exactly the resource the client asked for, any
        // absolute URL (oidc-provider already refuses fragments and relative URIs).
        defaultResource: (_ctx, _client, oneOf) => oneOf,
        useGrantedResource: () => true,
        getResourceServerInfo: (_ctx, resourceIndicator) => ({
          audience: resourceIndicator,
          scope: opts.scopes.join(' '),
          accessTokenTTL: opts.ttl,
          accessTokenFormat: opts.jwtResources.has(resourceIndicator) ? 'jwt' : opts.accessTokenFormat,
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
    interactions: {
      url: (_ctx, interaction) => `${opts.issuerPath}/interaction/${interaction.uid}`,
    },
    findAccount: (_ctx, sub) => ({ accountId: sub, claims: () => ({ sub }) }),
    // Stored with an opaque token and spread into its introspection answer (the JWT format
    // already has sub = client id): see --client-credentials-sub.
    extraTokenClaims: (_ctx, token) => (
      token.kind === 'ClientCredentials' && token.format === 'opaque'
        && opts['client-credentials-sub'] === 'client_id'
        ? { sub: token.clientId } : undefined
    ),
    ttl: {
      AccessToken: () => opts.ttl,
      ClientCredentials: () => opts.ttl,
      AuthorizationCode: () => 60,
      IdToken: () => opts.ttl,
      Interaction: () => 600,
      Session: () => 3600,
      Grant: () => 3600,
      RefreshToken: () => 3600,
    },
    renderError: (ctx, out) => {
      ctx.type = 'json';
      ctx.body = out;
    },
  };
}

// --auto-login: answer the login prompt as `accountId`, then consent to everything requested.
async function autoInteraction(provider, accountId, req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params } = details;
  if (prompt.name === 'login') {
    await provider.interactionFinished(req, res, { login: { accountId } }, { mergeWithLastSubmission: false });
    return;
  }
  if (prompt.name !== 'consent') throw new Error(`unsupported prompt ${prompt.name}`);
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
  const missing = prompt.details;
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const grantId = await grant.save();
  const consent = details.grantId ? {} : { grantId };
  await provider.interactionFinished(req, res, { consent }, { mergeWithLastSubmission: true });
}

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

const CONTROL_PATH = '/_test/introspection';
const MAX_DELAY_MS = 120_000;

// GET/POST /_test/introspection: see the header. Returns false if the query is not acceptable.
function controlIntrospection(control, req, res) {
  const { searchParams } = new URL(req.url ?? '/', 'http://127.0.0.1');
  if (req.method === 'POST') {
    const delay = searchParams.get('delay_ms');
    const status = searchParams.get('fail_status');
    const delayMs = delay === null ? control.delay_ms : Number(delay);
    const failStatus = status === null ? control.fail_status : Number(status);
    if (!Number.isInteger(delayMs) || delayMs < 0 || delayMs > MAX_DELAY_MS
      || !Number.isInteger(failStatus) || (failStatus !== 0 && (failStatus < 100 || failStatus > 599))) {
      return sendJson(res, 400, { error: 'delay_ms must be 0..120000 and fail_status 0 or 100..599' });
    }
    Object.assign(control, { delay_ms: delayMs, fail_status: failStatus });
  } else if (req.method !== 'GET') {
    return sendJson(res, 405, { error: 'GET or POST' });
  }
  return sendJson(res, 200, control);
}

function main() {
  const opts = options();
  let provider; // set once the port, hence the issuer, is known
  let callback;
  const prefix = opts.issuerPath;
  const control = { requests: 0, revocations: 0, delay_ms: 0, fail_status: 0 };

  const server = http.createServer((req, res) => {
    if (!provider) return sendJson(res, 503, { error: 'starting' });
    const url = req.url ?? '/';
    if (url === CONTROL_PATH || url.startsWith(`${CONTROL_PATH}?`)) {
      return controlIntrospection(control, req, res);
    }
    if (prefix) {
      // Mount the provider under the issuer's path like Keycloak's /realms/<name>; baseUrl is
      // how oidc-provider learns the mount path (as under Express) to build its URLs.
      if (url !== prefix && !url.startsWith(`${prefix}/`) && !url.startsWith(`${prefix}?`)) {
        return sendJson(res, 404, { error: 'not_found' });
      }
      req.baseUrl = prefix;
      req.url = url.slice(prefix.length) || '/';
    }
    const interaction = /^\/interaction\/([\w-]+)(?:\?.*)?$/.exec(req.url);
    if (interaction) {
      if (!opts['auto-login']) {
        return sendJson(res, 501, { error: 'no interactive login; start with --auto-login <account>' });
      }
      autoInteraction(provider, opts['auto-login'], req, res).catch((err) => {
        console.error('interaction failed:', err);
        if (!res.headersSent) sendJson(res, 400, { error: 'interaction_failed', error_description: String(err.message) });
      });
      return undefined;
    }
    const path = req.url.split('?', 1)[0];
    if (path === '/token/revocation') control.revocations += 1;
    if (path === '/token/introspection') {
      control.requests += 1;
      if (control.fail_status) {
        return sendJson(res, control.fail_status, { error: 'temporarily_unavailable' });
      }
      if (control.delay_ms) {
        setTimeout(() => callback(req, res), control.delay_ms);
        return undefined;
      }
    }
    return callback(req, res);
  });

  let stopping = false;
  const stop = (why) => {
    if (stopping) return;
    stopping = true;
    console.error(`oidc provider stopping (${why})`);
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  if (opts['exit-on-stdin-close']) {
    process.stdin.on('end', () => stop('stdin closed'));
    process.stdin.on('error', () => stop('stdin error'));
    process.stdin.resume();
  }

  server.on('error', (err) => {
    console.error(`oidc provider cannot listen: ${err.message}`);
    process.exit(1);
  });
  server.listen(opts.port, '127.0.0.1', () => {
    const { port } = server.address();
    const issuer = `http://127.0.0.1:${port}${prefix}`;
    provider = new Provider(issuer, configuration(opts));
    provider.on('server_error', (_ctx, err) => console.error('server_error:', err));
    provider.on('grant.error', (_ctx, err) => console.error('grant.error:', err.message, err.error_description ?? ''));
    callback = provider.callback();
    process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
  });
}

try {
  main();
} catch (err) {
  console.error(`oidc provider: ${err.message}`);
  process.exit(2);
}
