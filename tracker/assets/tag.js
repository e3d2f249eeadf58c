/*! adtrack tag v1: <script async src="https://TRACKER/v1/tag.js" data-program="ID"></script> */
(function (w, d) {
  "use strict";
  var me = d.currentScript;
  if (!me || w.adtrack) return;
  var program = me.getAttribute("data-program");
  var url = me.src.replace(/\/tag\.js(\?.*)?$/, "/events");
  // Consent strings the page's ad stack hands over (IAB TCF v2, GPP).
  var consent = {};
  ["gdpr", "gdpr_consent", "gpp", "gpp_sid"].forEach(function (k) {
    var v = me.getAttribute("data-" + k.replace("_", "-"));
    if (v !== null) consent[k] = v;
  });
  var queue = [];
  var timer = 0;

  function send() {
    timer = 0;
    // At most 50 events a request: well inside a beacon's 64 KB and the
    // tracker's events per batch.
    while (queue.length) post(queue.splice(0, 50));
  }

  function post(events) {
    var body = events.map(function (e) {
      return JSON.stringify(e);
    }).join("\n");
    var sent = false;
    try {
      sent = navigator.sendBeacon && navigator.sendBeacon(url, body);
    } catch (e) {}
    if (!sent && w.fetch) {
      w.fetch(url, {
        method: "POST",
        body: body,
        keepalive: true,
        mode: "no-cors",
        credentials: "include",
        headers: { "content-type": "text/plain" }
      }).catch(function () {});
    }
  }

  function track(type, params) {
    if (!program) return;
    var p = {};
    var k;
    for (k in consent) p[k] = consent[k];
    for (k in params || {}) {
      if (params[k] !== null && params[k] !== undefined) p[k] = String(params[k]);
    }
    var e = { programId: program, type: type || "custom", page: location.href, params: p };
    if (d.referrer) e.referrer = d.referrer;
    queue.push(e);
    // Events of one task leave together, in one request.
    if (!timer) timer = setTimeout(send, 0);
  }

  w.adtrack = { track: track, version: 1 };
  track("impression");
  var early = w.adtrackq || [];
  for (var i = 0; i < early.length; i++) track(early[i][0], early[i][1]);
  w.adtrackq = { push: function (c) { track(c[0], c[1]); } };
  // Whatever is still queued leaves when the page goes away.
  w.addEventListener("pagehide", send);
  d.addEventListener("visibilitychange", function () {
    if (d.visibilityState === "hidden") send();
  });
})(window, document);
