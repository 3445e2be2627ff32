/*
 * Shared by the chat pages: JSON fetch helpers, client message ids, and who the user is.
 *
 * Login modes (GET /chat/user answers {"name","token","auth"} or 401 {"error","auth"}):
 *   anonymous  the server names a guest (stable per browser through a cookie); CONNECT sends it as `login`.
 *   users      the page asks login/passcode, checks them with POST /chat/login (which also sets the
 *              HttpOnly chat_session cookie the REST calls need), keeps them for this tab
 *              (sessionStorage) and sends them in CONNECT.
 *   jwt        POST /chat/login answers a token (and sets an HttpOnly cookie); CONNECT sends `token`.
 *              Before every (re)connect the page asks /chat/user for a fresh token.
 *
 * Every user-supplied string is put into the page with textContent, never as HTML.
 */
(function () {
  'use strict';

  const CREDENTIALS_KEY = 'chat.credentials';

  class HttpError extends Error {
    constructor(status, body) {
      super((body && body.error) || ('HTTP ' + status));
      this.status = status;
      this.body = body;
    }
  }

  async function api(path, options) {
    let response = await fetch(path, Object.assign({credentials: 'same-origin', cache: 'no-store'}, options));
    // users mode: the REST calls need the chat_session cookie that /chat/login sets (it lives one hour);
    // when it has expired but this tab still holds the credentials, log in again once and retry.
    const saved = response.status === 401 && path !== '/chat/login' ? storedCredentials() : null;
    if (saved) {
      const again = await fetch('/chat/login', {method: 'POST', credentials: 'same-origin', cache: 'no-store',
                                                body: new URLSearchParams(saved)});
      if (again.ok) {
        response = await fetch(path, Object.assign({credentials: 'same-origin', cache: 'no-store'}, options));
      }
    }
    let body = null;
    const type = response.headers.get('content-type') || '';
    if (type.indexOf('json') >= 0) {
      body = await response.json();
    }
    if (!response.ok) {
      throw new HttpError(response.status, body);
    }
    return body;
  }

  function postForm(path, fields) {
    return api(path, {method: 'POST', body: new URLSearchParams(fields)});
  }

  /* A v4 UUID; crypto.randomUUID needs a secure context, getRandomValues does not. */
  function uuid() {
    if (window.crypto && typeof window.crypto.randomUUID === 'function' && window.isSecureContext) {
      return window.crypto.randomUUID();
    }
    const b = new Uint8Array(16);
    window.crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' + h.slice(16, 20) + '-' + h.slice(20);
  }

  function storedCredentials() {
    try {
      const value = JSON.parse(sessionStorage.getItem(CREDENTIALS_KEY) || 'null');
      return value && typeof value.login === 'string' && typeof value.passcode === 'string' ? value : null;
    } catch (e) {
      return null;
    }
  }

  /*
   * The signed-in user: {name, auth, connectHeaders(): Promise<object>}.
   * Shows the page's #login form when a login is needed and resolves once it succeeded.
   */
  class Identity {
    constructor() {
      this.name = '';
      this.auth = 'anonymous';
      this.token = '';
      this.onLoginNeeded = null;
    }

    async resolve() {
      try {
        const info = await api('/chat/user');
        this.accept(info);
        return this;
      } catch (err) {
        if (!(err instanceof HttpError) || err.status !== 401) {
          throw err;
        }
        this.auth = (err.body && err.body.auth) || 'jwt';
      }
      if (this.auth === 'users') {
        const saved = storedCredentials();
        if (saved) {
          this.name = saved.login;
          this.showWho();
          return this;
        }
      }
      await this.login();
      return this;
    }

    accept(info) {
      this.name = info.name || '';
      this.token = info.token || '';
      this.auth = info.auth || (this.token ? 'jwt' : 'anonymous');
      this.showWho();
    }

    showWho() {
      const who = document.getElementById('whoami');
      if (who) {
        who.textContent = this.name;
      }
      const logout = document.getElementById('logout');
      if (logout) {
        logout.hidden = this.auth === 'anonymous' || !this.name;
        logout.onclick = () => this.logout();
      }
    }

    /* Show the login form until the server accepts a login/passcode. */
    login(message) {
      const section = document.getElementById('login');
      const form = document.getElementById('login-form');
      const error = document.getElementById('login-error');
      document.body.dataset.state = 'login';
      section.hidden = false;
      error.textContent = message || '';
      form.elements.login.focus();
      return new Promise((resolve) => {
        form.onsubmit = async (event) => {
          event.preventDefault();
          const login = form.elements.login.value.trim();
          const passcode = form.elements.passcode.value;
          error.textContent = '';
          try {
            const info = await postForm('/chat/login', {login: login, passcode: passcode});
            this.accept(info);
            if (this.auth === 'users') {
              sessionStorage.setItem(CREDENTIALS_KEY, JSON.stringify({login: login, passcode: passcode}));
            }
            form.elements.passcode.value = '';
            section.hidden = true;
            resolve(this);
          } catch (err) {
            error.textContent = err.message;
          }
        };
      });
    }

    async logout() {
      sessionStorage.removeItem(CREDENTIALS_KEY);
      try {
        await api('/chat/logout', {method: 'POST'});
      } catch (e) { /* the cookie may already be gone */ }
      window.location.reload();
    }

    /* Headers for the STOMP CONNECT frame, refreshed before every (re)connect. */
    async connectHeaders() {
      if (this.auth === 'users') {
        const saved = storedCredentials();
        return saved ? {login: saved.login, passcode: saved.passcode} : {};
      }
      if (this.auth === 'jwt') {
        try {
          this.accept(await api('/chat/user'));
        } catch (err) {
          if (err instanceof HttpError && err.status === 401) {
            await this.login('Your session expired: please log in again.');
          } else {
            throw err;
          }
        }
        return {token: this.token};
      }
      return this.name ? {login: this.name} : {};
    }

    forget() {
      sessionStorage.removeItem(CREDENTIALS_KEY);
    }
  }

  function formatTime(iso) {
    if (!iso) {
      return '';
    }
    const date = new Date(iso);
    if (isNaN(date.getTime())) {
      return '';
    }
    return date.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'});
  }

  window.Chat = {api: api, postForm: postForm, uuid: uuid, HttpError: HttpError, Identity: Identity,
                 formatTime: formatTime};
})();
