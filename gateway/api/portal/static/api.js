"use strict";
// Swagger UI (served from the swagger-ui-py package's static build) over /openapi.json.
window.addEventListener("load", function () {
  const el = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({url: el.dataset.url, domNode: el, deepLinking: false,
                               supportedSubmitMethods: []});
});
