import { defineConfig } from "vitest/config";

// The client library's tests run in Node; the React tests ask for jsdom
// themselves (a comment at the top of the file).
export default defineConfig({
  test: {
    include: ["js/test/**/*.test.js", "react/test/**/*.test.js"],
    environment: "node",
  },
});
