// vmfarm console: live updates on top of pages that read fine without JavaScript.
// [data-live-url] elements are replaced by a fresh rendering every few seconds while
// data-live="on"; a host's log [data-log-url] is followed over server-sent events.
(function () {
  "use strict";
  function refresh(el) {
    var url = el.getAttribute("data-live-url");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        var box = document.createElement("div");
        box.innerHTML = html;
        var fresh = box.firstElementChild;
        if (!fresh) { return; }
        var focused = document.activeElement && document.activeElement.id;
        el.replaceWith(fresh);
        if (focused) { var f = document.getElementById(focused); if (f) { f.focus(); } }
        if (fresh.getAttribute("data-live") === "on") { schedule(fresh); }
        else if (fresh.getAttribute("data-reload-when-done") === "on") { window.location.reload(); }
      })
      .catch(function () { schedule(el); });
  }
  function schedule(el) {
    var every = parseInt(el.getAttribute("data-live-every") || "2000", 10);
    window.setTimeout(function () { refresh(el); }, every);
  }
  function followLog(pre) {
    if (!window.EventSource) { return; }
    var url = pre.getAttribute("data-log-url") + "?after=" + (pre.getAttribute("data-after") || "0");
    var state = document.getElementById("log-state");
    var src = new EventSource(url);
    src.addEventListener("log", function (ev) {
      var c = JSON.parse(ev.data);
      var line = document.createElement("span");
      if (c.stream === "stderr") { line.className = "stderr"; }
      line.textContent = c.text;
      var atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.appendChild(line);
      if (atBottom) { pre.scrollTop = pre.scrollHeight; }
    });
    src.addEventListener("end", function (ev) {
      src.close();
      if (state) { state.textContent = "ended: " + JSON.parse(ev.data).status; }
    });
    if (state) { state.textContent = "following live"; }
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live-url][data-live='on']").forEach(schedule);
    document.querySelectorAll("pre[data-log-url][data-live='on']").forEach(followLog);
  });
})();
