package com.google.gson

/** Gson's JsonParseException (a RuntimeException), as Gson 2.10 (QuPath 0.4.4) to 2.13 (QuPath 0.7) have it. */
class JsonParseException extends RuntimeException {
    JsonParseException(String message, Throwable cause = null) { super(message, cause) }
}
