// Live progress bars: polls /ui/progress for the jobs on the page that are still queued or running, once a second,
// and reloads a job's own page when that job ends (so its results and figures appear). No framework, no build.
(function () {
  "use strict";
  var ACTIVE = { queued: true, running: true };

  function activeIds() {
    var ids = [];
    document.querySelectorAll("progress[data-active]").forEach(function (bar) {
      ids.push(bar.getAttribute("data-progress"));
    });
    return ids;
  }

  function update(job) {
    document.querySelectorAll('progress[data-progress="' + job.id + '"]').forEach(function (bar) {
      bar.value = job.percent;
      bar.textContent = job.percent + "%";
      var holder = bar.closest("tr") || bar.closest("section") || document;
      var pct = holder.querySelector("[data-percent]");
      if (pct) pct.textContent = job.percent + "%";
      var counts = holder.querySelector("[data-counts]");
      if (counts) counts.textContent = job.done + " / " + job.total + " ablations";
      var status = holder.querySelector("[data-status]") || document.querySelector('[data-status-of="' + job.id + '"]');
      if (status) { status.textContent = job.status; status.className = "status status-" + job.status; }
      if (!ACTIVE[job.status]) {
        bar.removeAttribute("data-active");
        if (bar.hasAttribute("data-reload-when-done")) window.location.reload();
      }
    });
  }

  function poll() {
    var ids = activeIds();
    if (!ids.length) return;
    fetch("/ui/progress?ids=" + encodeURIComponent(ids.join(",")), { credentials: "same-origin", cache: "no-store" })
      .then(function (response) { return response.ok ? response.json() : { jobs: [] }; })
      .then(function (body) { body.jobs.forEach(update); })
      .catch(function () { /* a missed poll is retried on the next tick */ })
      .then(function () { window.setTimeout(poll, 1000); });
  }

  document.addEventListener("DOMContentLoaded", function () { window.setTimeout(poll, 500); });
})();
