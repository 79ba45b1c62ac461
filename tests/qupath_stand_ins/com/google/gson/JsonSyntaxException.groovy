package com.google.gson

/** Gson's JsonSyntaxException: what Gson.fromJson throws on text that is not JSON, or JSON of another shape than the
 * type asked for (an array or a string where a Map is), as Gson 2.10 (QuPath 0.4.4) to 2.13 (QuPath 0.7) do. */
class JsonSyntaxException extends JsonParseException {
    JsonSyntaxException(String message, Throwable cause = null) { super(message, cause) }
}
