// FeatureScope's only script besides htmx: copy-link and copy-embed buttons, the contrast form's file pickers and the encode form's SAE budget total. Pages work without it;
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

  // The contrast form's file pickers: the chosen .txt / .jsonl file's text goes into a hidden field of the
  // form (the server parses it by the file's name), so the form posts as plain urlencoded fields.
  document.addEventListener("change", function (event) {
    var input = event.target;
    if (!input.matches || !input.matches("input[type=file][data-load-into]")) return;
    var field = document.querySelector(input.getAttribute("data-load-into"));
    var nameField = document.querySelector(input.getAttribute("data-load-into") + "-name");
    var status = document.querySelector(input.getAttribute("data-load-into") + "-status");
    var file = input.files && input.files[0];
    var limit = parseInt(input.getAttribute("data-max-bytes"), 10);
    field.value = "";
    if (nameField) nameField.value = "";
    if (!file) { if (status) status.textContent = ""; return; }
    if (limit && file.size > limit) {
      input.value = "";
      if (status) status.textContent = file.name + " is " + file.size + " bytes; at most " + limit + " are accepted.";
      return;
    }
    var reader = new FileReader();
    reader.onload = function () {
      field.value = reader.result;
      if (nameField) nameField.value = file.name;
      if (status) status.textContent = file.name + " loaded.";
    };
    reader.readAsText(file);
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
