// FeatureScope's only script besides htmx: copy-link and copy-embed buttons, the encode form's SAE budget total. Pages work without it;
// the link and the embed code are also shown in read-only fields.
(function () {
  "use strict";

  function currentLink() {
    var url = new URL(window.location.href);
    url.searchParams.delete("embed");
    return url.toString();
  }

  function fallbackCopy(text) {
    var field = document.createElement("textarea");
    field.value = text;
    field.setAttribute("readonly", "");
    field.style.position = "fixed";
    field.style.opacity = "0";
    document.body.appendChild(field);
    field.select();
    try { document.execCommand("copy"); } finally { document.body.removeChild(field); }
  }

  function copy(text, button) {
    var done = function () {
      var before = button.textContent;
      button.textContent = "Copied";
      button.classList.add("copied");
      setTimeout(function () { button.textContent = before; button.classList.remove("copied"); }, 1400);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { fallbackCopy(text); done(); });
    } else {
      fallbackCopy(text);
      done();
    }
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy], [data-copy-from]");
    if (!button) return;
    if (button.hasAttribute("data-copy-from")) {
      var field = document.querySelector(button.getAttribute("data-copy-from"));
      if (field) copy(field.value, button);
      return;
    }
    var value = button.getAttribute("data-copy");
    copy(value === "location" ? currentLink() : value, button);
  });

  // featurescope/memory.py's format_bytes: 1536 -> "1.5 KiB".
  function formatBytes(n) {
    var units = ["TiB", "GiB", "MiB", "KiB"];
    for (var i = 0; i < units.length; i++) {
      var size = Math.pow(1024, units.length - i);
      if (n >= size) return (n / size).toFixed(1) + " " + units[i];
    }
    return n + " B";
  }

  // The encode form: the chosen SAEs' weights beside the server's SAE memory budget, kept up to date as boxes change.
  document.addEventListener("change", function (event) {
    var picks = event.target.closest(".sae-picks");
    if (!picks) return;
    var total = 0;
    picks.querySelectorAll("input[data-bytes]:checked").forEach(function (box) { total += Number(box.getAttribute("data-bytes")); });
    var shown = picks.querySelector(".sae-total");
    shown.textContent = formatBytes(total);
    var budget = picks.getAttribute("data-budget");
    shown.classList.toggle("over", budget !== "" && total > Number(budget));
  });

  // After htmx swaps examples or pushes a new URL, keep the read-only share field in step with the address bar.
  document.addEventListener("htmx:pushedIntoHistory", function () {
    var field = document.querySelector(".share-url");
    if (field) field.value = currentLink();
  });
})();
